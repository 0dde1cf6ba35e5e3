"""The Petals RPCs behind procs/frontend.py: handlers.py (every RPC, unary and stream), session.py (one
rpc_inference stream), streams.py (hivemind's stream framing, read with bounds). Request checks that need
no tensor values live in protocol/requests.py."""
