"""The runtime's own checks of a request's values (node/runtime/checks.py): NaN and infinities are
refused whatever the size and dtype of the tensor (small float tensors are checked by numpy, the rest
by torch), and a finite tensor comes back on the runtime's device and dtype."""

from __future__ import annotations

import pytest
import torch

from node.runtime.checks import RequestError, Target, finite

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("numel", [64, 4096 * 17])  # under and over the numpy path's limit
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_at_any_size_and_dtype(dtype, numel, bad):
    x = torch.randn(1, numel // 64, 64).to(dtype)
    target = Target(dtype, CPU)
    assert finite(x, "hidden_states", target) is not None
    x[0, -1, 5] = bad
    with pytest.raises(RequestError, match="hidden_states contain NaN or infinite values"):
        finite(x, "hidden_states", target)


@pytest.mark.filterwarnings("ignore:The given buffer is not writable")
def test_a_read_only_frame_is_checked_and_converted_to_the_runtimes_dtype():
    frame = memoryview(torch.randn(1, 2, 64).numpy().tobytes())  # as a received ZeroMQ frame: read-only
    x = torch.frombuffer(frame, dtype=torch.float32).reshape(1, 2, 64)
    out = finite(x, "hidden_states", Target(torch.bfloat16, CPU))
    assert out.dtype == torch.bfloat16 and torch.equal(out, x.to(torch.bfloat16))
    assert finite(x, "hidden_states", Target(torch.float32, CPU)) is x
