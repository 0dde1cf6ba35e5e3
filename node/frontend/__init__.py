"""The Petals RPCs behind procs/frontend.py: handlers.py (every RPC, unary and stream), session.py (one
rpc_inference stream, rebuilt on a replaced runtime), history.py (what a session sent, to rebuild its
cache from), streams.py (hivemind's stream framing, read with bounds), limits.py (what peers may make the
frontend hold). Request checks that need no tensor values live in protocol/request_checks.py."""
