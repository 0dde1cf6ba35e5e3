"""Batching across sessions, on the blocks: works batched together give the same numbers as one at a time."""

from __future__ import annotations

import torch

from node.runtime import compute
from node.runtime.models import get_family
from node.weights.checkpoint import Checkpoint
from tests.helpers.paths import MICRO_LLAMA
from tests.helpers.reference import rel_err

TOL = 1e-5


def micro_blocks():
    checkpoint = Checkpoint.open(str(MICRO_LLAMA))
    config = checkpoint.config()
    family = get_family(config)
    return [
        family.block_class.from_state(
            config, checkpoint.block_state(f"model.layers.{i}.", dtype=torch.float32), dtype=torch.float32
        )
        for i in range(4)
    ]


def test_batched_pass_equals_one_work_at_a_time():
    blocks = micro_blocks()
    torch.manual_seed(0)

    def cache(batch, n):
        return [tuple(torch.randn(blocks[0].kv_cache_shape(batch, 32)) for _ in range(2)) for _ in range(n)]

    def works(caches):
        return [
            compute.Work(0, 4, torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(1)), caches[0], past=7),
            compute.Work(
                1,
                2,
                torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2)),
                caches[1],
                past=3,
                prompts=torch.randn(2, 1, 2, 64, generator=torch.Generator().manual_seed(3)),
            ),
            compute.Work(2, 2, torch.randn(3, 9, 64, generator=torch.Generator().manual_seed(4))),  # a forward
            compute.Work(0, 3, torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(5)), caches[2], past=0),
        ]

    caches = [cache(1, 4), cache(2, 2), cache(1, 3)]
    copies = [[(k.clone(), v.clone()) for k, v in c] for c in caches]
    together = compute.run(blocks, works(caches), max_chunk_bytes=2**28)
    alone = [compute.run(blocks, [w], max_chunk_bytes=2**28)[0] for w in works(copies)]
    for a, b in zip(together, alone):
        assert rel_err(a, b) <= TOL
    for c, d in zip(caches, copies):  # the caches were written identically
        for (k1, v1), (k2, v2) in zip(c, d):
            assert rel_err(k1, k2) <= TOL and rel_err(v1, v2) <= TOL
