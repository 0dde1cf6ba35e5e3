"""The node's actor processes: one module per role, each run as `python -m procs.<role> RUN_DIR NAME`.

- supervisor-spawned roles: announcer.py (the swarm), allocator.py (attention-cache admission),
  runtime.py (the blocks; rank 0 of a tensor-parallel group), runtime_rank.py (ranks 1..N-1),
  frontend.py (the Petals RPCs);
- what they share: actor.py (control plane, heartbeats, probe socket, graceful stop) and
  requester.py (request/reply over a DEALER).

Each role module reads top to bottom as what it owns, what it receives, what it sends; the logic it
runs lives in node/<role>/ (node/runtime/, node/frontend/, ...), free of sockets.
"""
