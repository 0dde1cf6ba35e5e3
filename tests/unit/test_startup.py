"""The import tricks of node/startup.py: the supervisor without torch or transformers, the resolver
without torch, the runtime without torch.distributed.tensor (each checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers.paths import ROOT


def test_the_supervisor_imports_neither_torch_nor_transformers():
    """torch costs the supervisor ~140 MiB and seconds of start-up, transformers 37 MiB for one read of
    the model's config: only the runtime needs torch, and the model is resolved in a child process
    (`python -m node.supervisor.resolve`) that imports transformers without torch."""
    import subprocess
    import sys

    from tests.helpers.paths import ROOT

    supervisor = (
        "import sys; from node.startup import light_hivemind; light_hivemind(); "
        "import node.supervisor.boot, node.supervisor.placement, node.supervisor.metrics, node.supervisor.sd_notify, "
        "node.supervisor.resolve, node.supervisor.daemon; "
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", supervisor], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    resolver = (
        "import sys; from node.startup import transformers_without_torch; transformers_without_torch(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", resolver], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_deferred_import_loads_on_first_use_and_keeps_sympy_out_of_the_runtime():
    script = textwrap.dedent(
        """
        import sys, types
        from node.startup import defer
        defer("xml.dom.minidom")
        import xml.dom.minidom as stub
        assert type(stub).__name__ == "_Deferred" and "xml.dom.expatbuilder" not in sys.modules
        assert stub.parseString("<a/>").documentElement.tagName == "a"  # the first read imports it
        assert type(sys.modules["xml.dom.minidom"]) is types.ModuleType
        assert sys.modules["xml.dom"].minidom is sys.modules["xml.dom.minidom"]
        import torch, procs.runtime  # the runtime process's imports: transformers without torch.distributed.tensor
        assert "sympy" not in sys.modules, "sympy imported"
        from torch.distributed.tensor import DTensor  # and who needs it still gets it
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.stdout.strip() == "OK", result.stderr[-3000:]


def test_a_runtime_s_openmp_threads_wait_passively_unless_the_operator_says_otherwise():
    """In a fresh process, as the runtime starts: libgomp reads OMP_WAIT_POLICY when torch loads it."""
    script = textwrap.dedent(
        """
        import os
        from node import startup
        startup.runtime_imports()
        import torch
        print(os.environ.get("OMP_WAIT_POLICY"))
        """
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        run_env = dict(env, **({"OMP_WAIT_POLICY": given} if given else {}))
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=run_env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expected
