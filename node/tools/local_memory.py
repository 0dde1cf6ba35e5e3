"""The baseline of node.bench's memory figure: peak PSS of plain transformers doing the same work once.

    python -m node.tools.local_memory MODEL_PATH DTYPE DEVICE BATCH LENGTH

Started by node.bench while the node is still stopping: it imports first, then waits for a line on stdin
before it loads the model, so that the node's processes no longer share its pages. Prints
`{"pss": bytes}`.
"""

from __future__ import annotations

import json
import sys

import psutil
import torch
from transformers import AutoModelForCausalLM

from node.tools.local_baseline import local_backward, local_forward, local_generate


def main() -> None:
    model_path, dtype, device = sys.argv[1], getattr(torch, sys.argv[2]), torch.device(sys.argv[3])
    batch, length = int(sys.argv[4]), int(sys.argv[5])
    sys.stdin.readline()  # the node is gone now
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    me = psutil.Process()
    peak = me.memory_full_info().pss
    hidden = torch.randn(batch, length, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    hidden = hidden.to(device, dtype)
    local_forward(model, hidden)
    peak = max(peak, me.memory_full_info().pss)
    local_backward(model, hidden, hidden)
    peak = max(peak, me.memory_full_info().pss)
    local_generate(model, torch.tensor([[1, 15, 27, 99]], device=device), 4)
    peak = max(peak, me.memory_full_info().pss)
    print(json.dumps({"pss": peak}))


if __name__ == "__main__":
    main()
