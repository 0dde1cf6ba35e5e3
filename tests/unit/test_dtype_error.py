"""node.tools.dtype_error: a serving dtype's outputs against float32 on the same blocks (issue 22 item 5),
run on the micro Llama."""

from __future__ import annotations

import json

import torch

from node.tools import dtype_error
from tests.helpers.paths import MICRO_LLAMA


def test_bfloat16_is_measured_against_float32_on_the_same_blocks(tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert dtype_error.main(["--model", str(MICRO_LLAMA), "--tokens", "8", "--steps", "3", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["dtype"] == "bfloat16" and figures["blocks"] == 4 and len(figures["steps"]) == 4
    # bfloat16 keeps 8 bits of mantissa: off float32 by about 2**-8 relative, not 0 and not garbage
    for row in figures["steps"]:
        assert 1e-4 < row["norm_rel"] < 5e-2 and 1e-4 < row["max_rel"] < 1e-1, row
        assert row["float32_s"] > 0 and row["bfloat16_s"] > 0
    assert torch.is_grad_enabled()  # the tool leaves its caller's grad mode alone (later tests need it)
    printed = capsys.readouterr().out
    assert "bfloat16 against float32" in printed and "prefill of 8 tokens" in printed and "3 one-token steps" in printed
