"""Tensor parallelism on the CPU: a function run on two ranks of a gloo group, in two processes."""

from __future__ import annotations


def _gloo_rank(rank: int, world: int, store: str, fn, args: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        try:
            out = fn(rank, world, *args)
        except Exception as e:  # reported, not hung: the other rank fails the same way
            out = repr(e)
        if rank == 0:
            results.put(out)
    finally:
        dist.destroy_process_group()


def on_two_gloo_ranks(fn, store: str, *args, timeout: float = 240.0):
    """`fn(rank, 2, *args)` in two spawned processes joined in a gloo group (tensor parallelism on the
    CPU); rank 0's result, or the repr of its exception. `fn` must be importable (module level); both
    processes are gone when this returns."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(rank, 2, store, fn, args, results)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        return results.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
