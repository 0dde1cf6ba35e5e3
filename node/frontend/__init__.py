"""What a network frontend (procs/frontend.py) does with the Petals RPCs it serves.

rpcs.py: every RPC, unary and stream (read, check, run, encode); session.py: one rpc_inference stream,
rebuilt on a replaced runtime; runtime_link.py: a request's round trip to the runtime and its failover;
open_sessions.py: the sessions open here; pushes.py: pushes to the next servers of a chain; history.py:
what a session sent, to rebuild its cache from; streams.py: p2pd binary streams read with bounds;
limits.py: what peers may make the frontend hold; counters.py: the metrics; errors.py: what the parts
tell each other. A request's checks and decoding are protocol/request_checks.py's.
"""
