"""The block runtime's torch side, used by procs/runtime.py (rank 0) and procs/runtime_rank.py.

loading.py reads blocks (sharded, quantized, with adapters); checks.py checks what needs tensor values
or the cache; scheduler.py orders the work; compute.py runs it through the blocks in batches;
kv_cache.py holds the sessions' attention caches; models/ has one module per model family;
tensor_parallel/ splits blocks over devices; capacity.py and throughput.py measure the device.
"""
