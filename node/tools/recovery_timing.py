"""For `python -m node.bench`: what a replaced runtime costs a session, measured on a running node.

A session prefills RECOVERY_TOKENS tokens; the runtime is killed with -9 while the session is idle; once
the supervisor's replacement is ready (the restart), the session's next step is timed: the frontend
rebuilds the session's cache from its history (one prefill of RECOVERY_TOKENS tokens) and runs the step
(node/frontend/session.py). The baseline is the same RECOVERY_TOKENS + 1 tokens through the model's
layers in plain transformers, in this process.
"""

from __future__ import annotations

import os
import signal
import time

import torch

RECOVERY_TOKENS = 512


def measure_session_recovery(node, client, span, model, local_layers, dtype, device, timeout: float = 180.0):
    """(figures, the rebuilt session's output, transformers' output for the same position)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, RECOVERY_TOKENS + 1, model.config.hidden_size, generator=g).to(dtype)
    with client.session(max_length=RECOVERY_TOKENS + 1, start=span.start, end=span.end, route=[span]) as session:
        session.step(x[:, :RECOVERY_TOKENS])
        old = node.status["actors"]["runtime.0"]["pid"]
        killed = time.monotonic()
        os.kill(old, signal.SIGKILL)
        while True:
            runtime = node.status.get("actors", {}).get("runtime.0", {})
            if runtime.get("pid") not in (None, old) and runtime.get("ready"):
                break
            if time.monotonic() - killed > timeout:
                raise TimeoutError(f"the runtime was not replaced within {timeout:.0f} s")
            time.sleep(0.02)
        restart = time.monotonic() - killed
        began = time.monotonic()
        out = session.step(x[:, RECOVERY_TOKENS:])
        rebuild = time.monotonic() - began
    with torch.no_grad():
        began = time.monotonic()
        expected = local_layers(model, x.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        local = time.monotonic() - began
    figures = {"tokens": RECOVERY_TOKENS, "restart_s": restart, "rebuild_s": rebuild, "local_s": local}
    return figures, out, expected[:, RECOVERY_TOKENS:].cpu()
