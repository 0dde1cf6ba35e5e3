"""A depth limit for hivemind's msgpack decoding, which the DHT applies to whatever any peer stores or sends.

hivemind decodes a tuple as an ext type whose payload is decoded again, through the same hook: each level of
nesting is a level of recursion through msgpack's C unpacker, and about 200 levels (1.5 KB of bytes, a
value or a subkey any peer may store under our blocks' keys) overflow the C stack: the process dies of
SIGSEGV, not an exception, and a stored value kills every announcer that reads it. Real records nest a few
levels (a ServerInfo tuple in a dictionary value)."""

from __future__ import annotations

import threading

MAX_DEPTH = 32

_depth = threading.local()


def install(max_depth: int = MAX_DEPTH) -> None:
    """Every ext type hivemind decodes from now on counts one level; past `max_depth` it decodes as an empty
    tuple, a value no real record holds and every reader of records skips (protocol/dht_records.py
    read_servers: not a server info, not a peer id). Not an exception: raised inside hivemind's DHT search,
    one would fail a whole read, or leave it waiting."""
    from hivemind.utils.serializer import MSGPackSerializer

    decode = MSGPackSerializer.__dict__["_decode_ext_types"].__func__
    if getattr(decode, "depth_limited", False):
        return

    def limited(cls, type_code: int, data: bytes):
        depth = getattr(_depth, "value", 0)
        if depth >= max_depth:
            return ()
        _depth.value = depth + 1
        try:
            return decode(cls, type_code, data)
        finally:
            _depth.value = depth

    limited.depth_limited = True
    MSGPackSerializer._decode_ext_types = classmethod(limited)
