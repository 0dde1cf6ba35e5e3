"""The node's actor processes: one module per role, each run as `python -m procs.<role> RUN_DIR NAME`.

- supervisor-spawned roles: announcer.py (the swarm), allocator.py (attention-cache admission),
  runtime.py (the blocks; rank 0 of a tensor-parallel group), runtime_rank.py (ranks 1..N-1),
  frontend.py (the Petals RPCs);
- what they share: actor.py (control plane, heartbeats, probe socket, graceful stop) and
  runtime_start.py (both runtime processes' start: the order to load, the load).

A role module is only its process: the sockets it owns, the loop that receives and sends, its main. Each
reads top to bottom as what it owns, what it receives, what it sends; everything it decides lives in
node/<role>/ (the runtime's Engine, the allocator's Admission, the announcer's Presence, the frontend's
Rpcs), free of sockets, and nothing under node/ imports procs/.
"""
