"""Put off a module that a library imports at import time but our processes never use.

transformers, on import with torch present, imports torch.distributed.tensor (for its own tensor
parallelism and debugging), and that imports sympy: about 40 MiB and 0.4 s in every runtime process,
which only needs transformers' configs, activations and rope tables. `defer(name)` puts a stand-in in
sys.modules (and on the parent package) that imports the real module the first time anything is read
from it, so code that does use it still works, paying the import then.
"""

from __future__ import annotations

import importlib
import sys
import types


class _Deferred(types.ModuleType):
    def __getattr__(self, attr: str):
        return getattr(_load(self.__name__), attr)


def _load(name: str) -> types.ModuleType:
    if isinstance(sys.modules.get(name), _Deferred):
        del sys.modules[name]
        parent, _, child = name.rpartition(".")
        if isinstance(getattr(sys.modules.get(parent), child, None), _Deferred):
            delattr(sys.modules[parent], child)
    return importlib.import_module(name)  # binds the real module on its parent too


def defer(name: str) -> None:
    """Stand in for `name` (a submodule of an already importable package) until first use."""
    if name in sys.modules:
        return
    parent, _, child = name.rpartition(".")
    stub = _Deferred(name)
    sys.modules[name] = stub
    setattr(importlib.import_module(parent), child, stub)
