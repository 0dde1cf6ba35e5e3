"""What goes wrong between a frontend's RPCs and the actors behind them, as the RPCs tell each other."""

from __future__ import annotations


class ShuttingDown(RuntimeError):
    """The frontend stops (or retires after a reload): new work is refused, open sessions are ended."""


class RuntimeReplaced(Exception):
    """The runtime went away while it held a request: its replacement can take it again."""


class RuntimeLostCache(RuntimeError):
    """The runtime does not hold this session's cache (it was replaced, or the grant ended): the session
    rebuilds it from its history. The runtime's side of it is node/runtime/kv_cache.py's CacheMissing."""


class SessionBusy(RuntimeError):
    """A push into a session whose queue is full: the client's own copy of the step will come."""
