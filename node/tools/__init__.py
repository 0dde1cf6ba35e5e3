"""What the commands and the tests use: launcher.py starts a whole node as a user would, tinymodel.py
makes tiny random checkpoints, local_baseline.py is plain transformers doing what node.bench times,
local_memory.py and petals_client.py are scripts node.bench and node.bench_petals run in other
processes, recovery_timing.py times a session surviving its runtime for node.bench; petals_env.py
builds the real Petals 2.2.0 that the tests and node.bench_petals run against."""
