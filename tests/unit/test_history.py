"""A session's history (node/frontend/history.py): what a new runtime prefills to rebuild the cache.

Checked against what the runtime does to its cache: inputs cast to the node's dtype as torch casts them,
beams reordered by hypo_ids, positions after a rollback forgotten, deep prompts added where they were sent.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from node.frontend.history import History, HistoryLost, convert, last_positions
from protocol.wire import RawTensor

TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def raw(tensor: torch.Tensor) -> RawTensor:
    dtype = str(tensor.dtype).removeprefix("torch.")
    data = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return RawTensor(dtype, tuple(tensor.shape), data)


def tensor(r: RawTensor) -> torch.Tensor:
    return torch.frombuffer(bytearray(bytes(r.data)), dtype=TORCH[r.dtype]).reshape(r.shape)


@pytest.mark.parametrize("src", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("dst", ["float32", "float16", "bfloat16"])
def test_conversion_rounds_as_torch_does(src, dst):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4096, generator=g) * torch.logspace(-6, 4, 4096)
    values = torch.cat([values, torch.tensor([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 65504.0, 1e-8])])
    if dst == "float16":
        values = values.clamp(-65000, 65000)  # the runtime refuses what overflows its dtype
    x = values.to(TORCH[src])
    expected = x.to(TORCH[dst]).view(torch.uint8).numpy()
    got = convert(raw(x).data, src, dst)
    assert np.array_equal(got, expected)


def history(batch=2, max_length=16, hidden=4, dtype="float32"):
    return History(batch, max_length, hidden, dtype, reserved=batch * max_length * hidden * 4)


def test_replay_is_what_the_cache_was_built_from_after_beams_and_a_rollback():
    g = torch.Generator().manual_seed(1)
    h = history()
    first, second, third = (torch.randn(2, n, 4, generator=g) for n in (5, 3, 2))
    h.record(0, raw(first), None, None)
    h.record(5, raw(second), None, raw(torch.tensor([1, 1])))  # both beams continue row 1
    h.record(6, raw(third), None, raw(torch.tensor([1, 0])))  # rollback to 6, rows swapped
    cache = torch.cat([first[[1, 1]], second[:, :1]], dim=1)  # what the runtime holds at 6 ...
    cache = torch.cat([cache[[1, 0]], third], dim=1)  # ... reordered, then the new step
    hidden, prompts = h.replay()
    assert prompts is None and hidden.shape == (2, 8, 4)
    assert torch.equal(tensor(hidden), cache)


def test_the_step_after_a_restart_goes_in_the_rebuild_where_nothing_differs():
    """One prefill of the history and the step (the output: its last positions) where the step continues
    the history with no deep prompts held; a rollback or deep prompts keep the rebuild and the step apart."""
    g = torch.Generator().manual_seed(3)
    h = history(dtype="bfloat16")
    first, step = torch.randn(2, 5, 4, generator=g), torch.randn(2, 2, 4, generator=g)
    h.record(0, raw(first), None, None)
    both = h.replay_with(5, raw(step))
    assert both.shape == (2, 7, 4) and both.dtype == "bfloat16"
    assert torch.equal(tensor(both), torch.cat([first, step], dim=1).to(torch.bfloat16))  # cast as the runtime does
    assert torch.equal(tensor(last_positions(both, 2)), step.to(torch.bfloat16))
    assert h.replay_with(4, raw(step)) is None  # a rollback: the history must be cut first
    assert h.replay_with(5, raw(torch.randn(1, 2, 4))) is None  # not the session's batch
    assert history().replay_with(0, raw(step)) is None  # nothing to rebuild: the step alone
    h.record(5, raw(step), raw(torch.randn(4, 2, 1, 4, generator=g)), None)
    assert h.replay_with(7, raw(step)) is None  # deep prompts go with the history's own prefill


def test_prompts_are_kept_only_where_sent_and_rolled_back_with_their_positions():
    g = torch.Generator().manual_seed(2)
    h = history()
    prompts = torch.randn(3, 1, 2, 4, generator=g)  # 3 blocks, one row for every beam, 2 positions
    h.record(0, raw(torch.randn(2, 4, 4, generator=g)), raw(prompts), None)
    h.record(4, raw(torch.randn(2, 1, 4, generator=g)), None, None)
    _, replayed = h.replay()
    assert replayed.shape == (3, 2, 2, 4)  # only the positions the prompts were sent for
    assert torch.equal(tensor(replayed), prompts.expand(3, 2, 2, 4))
    assert h.nbytes == 2 * 16 * 4 * 4 + prompts.numel() * 4
    h.record(1, raw(torch.randn(2, 1, 4, generator=g)), None, None)  # rollback into the prompted positions
    _, replayed = h.replay()
    assert torch.equal(tensor(replayed), prompts[:, :, :1].expand(3, 2, 1, 4))
    h.record(0, raw(torch.randn(2, 1, 4, generator=g)), None, None)
    assert h.replay()[1] is None


def test_a_bfloat16_node_keeps_float32_inputs_as_the_runtime_casts_them():
    g = torch.Generator().manual_seed(3)
    h = History(1, 8, 4, "bfloat16", reserved=1 * 8 * 4 * 2)
    x = torch.randn(1, 3, 4, generator=g)
    h.record(0, raw(x), None, None)
    hidden, _ = h.replay()
    assert hidden.dtype == "bfloat16" and torch.equal(tensor(hidden), x.to(torch.bfloat16))
    assert h.nbytes == 1 * 8 * 4 * 2


def test_without_a_reservation_nothing_is_kept_and_the_reason_is_clear():
    h = History(1, 8, 4, "float32", reserved=0)
    h.record(0, raw(torch.ones(1, 2, 4)), None, None)
    assert h.nbytes == 0
    with pytest.raises(HistoryLost, match="history memory .*--history_bytes.* was full"):
        h.replay()


def test_the_bytes_to_reserve_for_deep_prompts_are_what_the_history_then_holds():
    g = torch.Generator().manual_seed(4)
    h = history()
    assert h.reserved == h.bytes_with(0, None) == 2 * 16 * 4 * 4  # the hidden states the session opened with
    steps = [  # (position, length, prompt positions): prompts, a plain step, a rollback into them, prompts again
        (0, 4, 3),
        (4, 2, 0),
        (2, 1, 0),
        (3, 2, 2),
        (0, 1, 1),
    ]
    for position, length, covered in steps:
        prompts = raw(torch.randn(3, 2, covered, 4, generator=g)) if covered else None
        need = h.bytes_with(position, prompts)
        h.record(position, raw(torch.randn(2, length, 4, generator=g)), prompts, None)
        assert h.nbytes == need, (position, length, covered)
    h.forget("gone")
    assert h.nbytes == h.reserved == 0
    with pytest.raises(HistoryLost, match="gone"):
        h.replay()
