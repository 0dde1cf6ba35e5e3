"""The node: a Petals-compatible swarm server built as a supervised multiprocess actor system.

The commands an operator runs are the modules at this level:
    python -m node.supervisor   run a node (node/supervisor/; also the console script `petals-node`)
    python -m node.probe        watch a running node's messages, stats and steps
    python -m node.bench        the node against plain transformers on this machine
    python -m node.bench_petals the node against a Petals server, both driven by a Petals client
    python -m node.demo         a tiny model, a private swarm, a short generation through the node
    python -m node.gpu_check    the one-shot check of everything that differs on CUDA (docs/gpu.md)

The rest is grouped by who uses it. Each actor has one home: its process is procs/<role>.py (sockets,
loop, main: only plumbing) and everything it decides is node/<role>/ (no sockets; docs/layout.md):
    supervisor/  the supervisor process: flags, the plan, p2pd, the process table, placement and
                 rebalancing moves, rolling reloads, metrics, systemd notify (torch-free)
    runtime/     the block runtime: its engine (rounds, scheduling, caches, moves), compute, model
                 families, quantization, LoRA adapters, tensor parallelism, block loading, measuring
    frontend/    the Petals RPCs: the RPC surface, inference sessions, the runtime link, pushes, limits
    allocator/   attention-cache admission: grants, limits, the directory of sessions, the budget
    announcer/   the node's presence in the swarm: its DHT records, reachability, next-server pings
    weights/     checkpoints on disk or on the hub, and the host's store of downloaded weights
    client/      a Petals-speaking client and client-side generation (tests, benchmarks, the demo)
    tools/       what the commands and tests use: starting a node, making tiny models, subprocess scripts,
                 building a real Petals to test against (petals_env.py)
    startup.py   what processes do before their heavy imports (every import trick, explained)
    code_version.py  which version of the code a process runs
    logs.py      structured logs, one JSON event per line
"""
