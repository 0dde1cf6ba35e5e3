"""The block runtime, run by procs/runtime.py (rank 0) and procs/runtime_rank.py (ranks 1..N-1).

engine.py is rank 0's engine (rounds, admission, forward/backward, caches, moves; no sockets);
tensor_parallel/rank.py is what the other ranks compute.

loading.py reads blocks (sharded, quantized, with adapters); checks.py checks what needs tensor values
or the cache; scheduler.py orders the work; compute.py runs it through the blocks in batches;
kv_cache.py holds the sessions' attention caches; models/ has one module per model family;
tensor_parallel/ splits blocks over devices; capacity.py and throughput.py measure the device.
"""
