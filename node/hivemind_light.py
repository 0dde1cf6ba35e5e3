"""Import hivemind's P2P and DHT without importing torch.

`import hivemind.p2p` runs hivemind/__init__.py first, which imports everything hivemind has (the
optimizers, mixture-of-experts, averaging) and with it torch: about 1.5 s and 150 MB per process.
The frontends and the announcer need none of that. `install()` puts light stand-ins for the packages
`hivemind`, `hivemind.utils` and `hivemind.dht` in sys.modules: their submodules import as usual,
the torch-free names that hivemind's p2p and DHT code take from `hivemind.utils` are served from
their submodules, and any other name runs the real package __init__ on first use, so nothing breaks
when some code path does need the rest (it only pays the import then).

hivemind is pinned to 1.1.12, whose layout this relies on; tests import through it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

# names hivemind.p2p and hivemind.dht.node import from the `hivemind.utils` package, by submodule
_UTILS = {
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
        if os.path.isdir(os.path.join(self.__path__[0], attr)) or os.path.isfile(os.path.join(self.__path__[0], attr + ".py")):
            return importlib.import_module(full)
        if not self._complete:  # something needs the whole package: run its real __init__ now
            self._complete = True
            spec = importlib.util.spec_from_file_location(self.__name__, self.__file__, submodule_search_locations=self.__path__)
            spec.loader.exec_module(self)
            return getattr(self, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")


def install() -> None:
    if "hivemind" in sys.modules:
        return  # already imported (light or whole): nothing to do
    spec = importlib.util.find_spec("hivemind")
    root = spec.submodule_search_locations[0]
    package = _LightPackage("hivemind", root, {})
    sys.modules["hivemind"] = package
    for sub, names in (("utils", _UTILS), ("dht", {})):
        light = _LightPackage(f"hivemind.{sub}", os.path.join(root, sub), names)
        sys.modules[light.__name__] = light
        setattr(package, sub, light)
