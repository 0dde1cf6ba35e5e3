"""What the node's processes do before their heavy imports, and why: every import trick lives here.

A process of the node pays for what it imports (torch: about 2.5 s and 280 MB per process here) and
must not outlive its parent. Each trick is a function that a process calls at the top of its entry
module, before the imports it affects; importing this module does nothing by itself.

- `light_hivemind()`: the frontends, the announcer and the supervisor need hivemind's P2P and DHT,
  not the torch that `import hivemind` drags in (hivemind/__init__ imports everything it has).
- `defer(name)`: transformers imports torch.distributed.tensor (and sympy) at import time, which the
  runtimes never use: 40 MiB and 0.4 s per runtime process, put off until first use.
- `runtime_imports()`: a runtime's OpenMP threads wait passively (they spun on a core the node's
  other processes need), and torch.distributed.tensor is deferred.
- `transformers_without_torch()`: the supervisor's model resolver reads configs with transformers,
  but must not import torch for it.
- `die_with_parent()` / `die_with_supervisor()`: Linux's parent-death signal, so that nothing the
  node started outlives a supervisor killed with -9.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import signal
import sys
import types

_PR_SET_PDEATHSIG = 1
SUPERVISOR_PID_ENV = "NODE_SUPERVISOR_PID"  # set by the supervisor in each actor's environment


# --- lifetime --------------------------------------------------------------------------------------


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent dies. Also a Popen preexec_fn for
    programs we cannot change (p2pd)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass  # not Linux: heartbeats and the owner's own cleanup are the fallback


def stop_with_parent() -> None:
    die_with_parent(signal.SIGTERM)


def die_with_supervisor() -> None:
    """In an actor, before its imports (seconds of torch, during which the supervisor may die): tie
    this process to the supervisor that started it. Outside an actor (no NODE_SUPERVISOR_PID), nothing."""
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    if not expected:
        return
    die_with_parent()
    if os.getppid() != int(expected):
        os._exit(1)  # the supervisor died before the line above ran


# --- hivemind without torch ----------------------------------------------------------------------
# `install` puts light stand-ins for the packages `hivemind`, `hivemind.utils` and `hivemind.dht` in
# sys.modules: their submodules import as usual, the torch-free names that hivemind's p2p and DHT code
# take from `hivemind.utils` are served from their submodules, and any other name runs the real
# package __init__ on first use, so nothing breaks when some code path does need the rest (it only
# pays the import then). hivemind is pinned to 1.1.12, whose layout this relies on.

_HIVEMIND_UTILS = {  # names hivemind.p2p and hivemind.dht.node import from `hivemind.utils`, by submodule
    "get_logger": "logging",
    "MSGPackSerializer": "serializer",
    "SerializerBase": "serializer",
    "get_dht_time": "timed_storage",
    "DHTExpiration": "timed_storage",
    "ValueWithExpiration": "timed_storage",
    "TimedStorage": "timed_storage",
    "MAX_DHT_TIME_DISCREPANCY_SECONDS": "timed_storage",
}


class _LightPackage(types.ModuleType):
    def __init__(self, name: str, path: str, names: dict[str, str]):
        super().__init__(name)
        self.__path__ = [path]
        self.__package__ = name
        self.__file__ = os.path.join(path, "__init__.py")
        self._light_names = names
        self._complete = False

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        submodule = self._light_names.get(attr)
        if submodule is not None:
            return getattr(importlib.import_module(f"{self.__name__}.{submodule}"), attr)
        full = f"{self.__name__}.{attr}"
        if full in sys.modules:  # a submodule still being imported (`import a.b.c as x` looks it up here)
            return sys.modules[full]
        if os.path.isdir(os.path.join(self.__path__[0], attr)) or os.path.isfile(
            os.path.join(self.__path__[0], attr + ".py")
        ):
            return importlib.import_module(full)
        if not self._complete:  # something needs the whole package: run its real __init__ now
            self._complete = True
            spec = importlib.util.spec_from_file_location(
                self.__name__, self.__file__, submodule_search_locations=self.__path__
            )
            spec.loader.exec_module(self)
            return getattr(self, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")


def light_hivemind() -> None:
    if "hivemind" in sys.modules:
        return  # already imported (light or whole): nothing to do
    spec = importlib.util.find_spec("hivemind")
    root = spec.submodule_search_locations[0]
    package = _LightPackage("hivemind", root, {})
    sys.modules["hivemind"] = package
    for sub, names in (("utils", _HIVEMIND_UTILS), ("dht", {})):
        light = _LightPackage(f"hivemind.{sub}", os.path.join(root, sub), names)
        sys.modules[light.__name__] = light
        setattr(package, sub, light)


# --- modules put off until first use ---------------------------------------------------------------


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
    """Stand in for `name` (a submodule of an importable package) until something reads from it; code
    that does use it still works, paying the import then."""
    parent, _, child = name.rpartition(".")
    package = importlib.import_module(parent)  # first: a package mid-import must not meet the stand-in
    if name in sys.modules:
        return
    stub = _Deferred(name)
    sys.modules[name] = stub
    setattr(package, child, stub)


def runtime_imports() -> None:
    """What a runtime process sets and defers before it imports torch and transformers.

    OpenMP's threads (torch's intra-op pool) wait for the next parallel region by spinning: between the
    small ops of a decode step, the runtime's second thread kept a core busy for nothing, the core that
    the node's frontend, stream keeper and p2pd need to pass the step on (a micro model's step: 12.9 ms
    of runtime CPU per 10.2 ms step, 3.8 ms once passive, the 8B shape's kernels no slower; docs/
    benchmarks.md). Passive threads sleep instead; read once, when torch loads libgomp. An operator's
    own OMP_WAIT_POLICY is kept."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    defer("torch.distributed.tensor")


# --- transformers without torch --------------------------------------------------------------------


def transformers_without_torch() -> None:
    """Import transformers' config classes without torch. USE_TORCH is read once, when transformers is
    imported, so it is set only around that import (child processes must not inherit it)."""
    if "transformers" in sys.modules:
        return
    os.environ["USE_TORCH"] = "0"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "no framework found" is expected here
    try:
        importlib.import_module("transformers.models.auto.configuration_auto")
    finally:
        del os.environ["USE_TORCH"]
