"""The DHT records Petals servers publish and clients read (PROTOCOL 2.1-2.5).

- Per block: key "<dht_prefix>.<i>", subkey = the server's base58 PeerID, value = to_tuple(ServerInfo),
  i.e. the msgpack tuple (state, throughput, extra) with `extra` in Petals' key order.
- Per model: key MODELS_KEY, subkey = dht_prefix, value = model_record(...).

Clients validate values with pydantic v1 and skip entries that fail; several fields are strict (a
throughput of 1 instead of 1.0 makes every client ignore the server). from_tuple() accepts exactly
what the Petals client accepts, to_tuple() produces exactly what it expects.

Pure Python: no hivemind, no torch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from decimal import Decimal
from enum import IntEnum
from typing import Any, Mapping, Optional

MODELS_KEY = "_petals.models"
UID_DELIMITER = "."


class ServerState(IntEnum):
    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


# the `extra` map's keys, in the order Petals writes them
EXTRA_KEYS = (
    "start_block",
    "end_block",
    "public_name",
    "version",
    "network_rps",
    "forward_rps",
    "inference_rps",
    "adapters",
    "torch_dtype",
    "quant_type",
    "using_relay",
    "cache_tokens_left",
    "next_pings",
)


@dataclass
class ServerInfo:
    state: ServerState
    throughput: float
    start_block: Optional[int] = None
    end_block: Optional[int] = None
    public_name: Optional[str] = None
    version: Optional[str] = None
    network_rps: Optional[float] = None
    forward_rps: Optional[float] = None
    inference_rps: Optional[float] = None
    adapters: tuple = ()
    torch_dtype: Optional[str] = None
    quant_type: Optional[str] = None
    using_relay: Optional[bool] = None
    cache_tokens_left: Optional[int] = None
    next_pings: Optional[dict] = None


# --- field checks ---------------------------------------------------------------------------------
# Each takes the field name and a value and returns the normalized value, or raises TypeError/ValueError
# naming the field. "strict" follows pydantic v1's strict types: a float must be a float (an int is
# refused), an int must be an int (a bool or a float is refused).


def _tname(value: Any) -> str:
    return type(value).__name__


def _strict_float(name: str, value: Any, *, allow_inf: bool = False) -> float:
    if not isinstance(value, float):
        raise TypeError(f"{name} must be a float, got {_tname(value)} {value!r}")
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def _strict_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {_tname(value)} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return int(value)


def _lax_str(name: str, value: Any) -> str:
    """pydantic v1's str: str as is, bytes decoded, numbers formatted."""
    if isinstance(value, str):
        return str.__str__(value)  # a plain str: msgpack (strict types) refuses str subclasses
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            raise ValueError(f"{name} is not valid UTF-8") from None
    if isinstance(value, (float, int, Decimal)):
        return str(value)
    raise TypeError(f"{name} must be a str, got {_tname(value)}")


_TRUE = {1, "1", "on", "t", "true", "y", "yes"}
_FALSE = {0, "0", "off", "f", "false", "n", "no"}


def _lax_bool(name: str, value: Any) -> bool:
    """pydantic v1's bool: bools, 0/1 and the usual yes/no words."""
    if value is True or value is False:
        return value
    probe = value.decode(errors="replace") if isinstance(value, bytes) else value
    if isinstance(probe, str):
        probe = probe.lower()
    try:
        if probe in _TRUE:
            return True
        if probe in _FALSE:
            return False
    except TypeError:  # unhashable
        pass
    raise TypeError(f"{name} must be a bool, got {_tname(value)} {value!r}")


def _optional(check, name: str, value: Any, **kwargs):
    return None if value is None else check(name, value, **kwargs)


def _adapters(name: str, value: Any) -> tuple:
    # pydantic v1 Sequence: list, tuple, set, frozenset (not str, not a map)
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(f"{name} must be a sequence of str, got {_tname(value)}")
    return tuple(_lax_str(f"{name}[{i}]", item) for i, item in enumerate(value))


def _next_pings(name: str, value: Any) -> dict:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a map of peer id -> float, got {_tname(value)}")
    out = {}
    for key, rtt in value.items():
        key = _lax_str(f"{name} key", key)
        out[key] = _strict_float(f"{name}[{key}]", rtt, allow_inf=True)  # inf = unreachable
    return out


def _state(value: Any) -> ServerState:
    try:
        # Enum lookup by value, like the client's ServerState(state): 2, 2.0 and True (== 1) all resolve
        return ServerState(value)
    except (ValueError, TypeError):
        raise ValueError(f"state must be one of 0 (OFFLINE), 1 (JOINING), 2 (ONLINE), got {value!r}") from None


def _check_extra(name: str, value: Any) -> Any:
    if name in ("start_block", "end_block", "cache_tokens_left"):
        return _optional(_strict_int, name, value)
    if name in ("network_rps", "forward_rps", "inference_rps"):
        return _optional(_strict_float, name, value)
    if name in ("public_name", "version", "torch_dtype", "quant_type"):
        return _optional(_lax_str, name, value)
    if name == "using_relay":
        return _optional(_lax_bool, name, value)
    if name == "adapters":
        if value is None:
            raise TypeError("adapters must be a sequence of str, got None")
        return _adapters(name, value)
    if name == "next_pings":
        return _optional(_next_pings, name, value)
    raise AssertionError(name)


# --- the block record ---------------------------------------------------------------------------


def to_tuple(info: ServerInfo) -> tuple:
    """(state, throughput, extra) with the exact types clients check; raises on a value they would refuse."""
    state = int(_state(info.state))
    throughput = _strict_float("throughput", _as_float("throughput", info.throughput))
    extra = {}
    for name in EXTRA_KEYS:
        value = getattr(info, name)
        if name in ("network_rps", "forward_rps", "inference_rps") and value is not None:
            value = _as_float(name, value)
        elif name == "next_pings" and value is not None:
            if not isinstance(value, Mapping):
                raise TypeError(f"next_pings must be a map of peer id -> float, got {_tname(value)}")
            value = {k: _as_float(f"next_pings[{k}]", v) for k, v in value.items()}
        elif name in ("start_block", "end_block", "cache_tokens_left") and value is not None:
            value = _as_int(name, value)
        elif name in ("public_name", "version", "torch_dtype", "quant_type") and value is not None:
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {_tname(value)}")
        elif name == "using_relay" and value is not None:
            if not isinstance(value, bool):
                raise TypeError(f"using_relay must be a bool, got {_tname(value)}")
        extra[name] = _check_extra(name, value)
    return (state, throughput, extra)


def _as_float(name: str, value: Any) -> float:
    """Publishing side: any real number becomes a Python float (ints would fail the client's strict check)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_tname(value)} {value!r}")
    return float(value)


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_tname(value)} {value!r}")
    return int(value)


def from_tuple(value: Any) -> ServerInfo:
    """A stored block-record value -> ServerInfo, accepting what the Petals client accepts.

    A 2-element (state, throughput) value is allowed, elements after the third and unknown keys of the
    extra map are ignored. Raises TypeError/ValueError naming the bad field (clients skip such entries).
    """
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"server info must be a tuple (state, throughput, extra), got {_tname(value)}")
    if len(value) < 2:
        raise ValueError(f"server info must have at least 2 elements (state, throughput), got {len(value)}")
    state = _state(value[0])
    throughput = _strict_float("throughput", value[1])
    extra = value[2] if len(value) > 2 else {}
    if not isinstance(extra, Mapping):
        raise TypeError(f"server info extra must be a map, got {_tname(extra)}")
    for key in extra:
        if not isinstance(key, str):
            raise TypeError(f"server info extra has a non-str key {key!r}")
    fields = {name: _check_extra(name, extra[name]) for name in EXTRA_KEYS if name in extra}
    return ServerInfo(state=state, throughput=throughput, **fields)


# --- model record and uids ------------------------------------------------------------------------


def model_record(num_blocks: int, repository: Optional[str]) -> dict:
    """The value stored under MODELS_KEY / subkey dht_prefix.

    repository: "https://huggingface.co/<model name>", or None for a model loaded from a local directory.
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
    if repository is not None and not isinstance(repository, str):
        raise TypeError(f"repository must be a str or None, got {_tname(repository)}")
    return {"num_blocks": num_blocks, "repository": repository}


def read_model_record(value: Any) -> tuple[int, Optional[str]]:
    """(num_blocks, repository) from a stored model record; unknown keys are ignored."""
    if not isinstance(value, Mapping):
        raise TypeError(f"model record must be a map, got {_tname(value)}")
    if "num_blocks" not in value:
        raise ValueError("model record has no num_blocks")
    num_blocks = value["num_blocks"]
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int):
        raise TypeError(f"num_blocks must be an int, got {_tname(num_blocks)} {num_blocks!r}")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    repository = _optional(_lax_str, "repository", value.get("repository"))
    return num_blocks, repository


def block_uids(prefix: str, start: int, end: int) -> list[str]:
    """["<prefix>.<start>", ..., "<prefix>.<end - 1>"]"""
    return [f"{prefix}{UID_DELIMITER}{i}" for i in range(start, end)]


async def read_servers(dht_node, prefix: str, num_blocks: int) -> dict[int, dict[str, ServerInfo]]:
    """Every valid server record per block of a hivemind DHTNode, as a Petals client reads them
    (latest=True: the whole DHT is searched and replicas merged). Invalid entries are skipped."""
    uids = block_uids(prefix, 0, num_blocks)
    found = await dht_node.get_many(uids, sufficient_expiration_time=float("inf"))
    out: dict[int, dict[str, ServerInfo]] = {}
    for index, uid in enumerate(uids):
        entry = found.get(uid)
        out[index] = {}
        if entry is None or not isinstance(entry.value, dict):
            continue
        for peer, item in entry.value.items():
            if not is_peer_id(peer):  # any peer may store any subkey: an int one broke sorting, a huge one bloated
                continue
            try:
                out[index][peer] = from_tuple(item.value)
            except (TypeError, ValueError):
                continue
    return out


BASE58 = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
MAX_PEER_ID_CHARS = 128  # a libp2p peer id in base58 is 46 to 53 characters


def is_peer_id(subkey: Any) -> bool:
    """Whether a record's subkey can be a peer id (base58), as the Petals client requires of it."""
    return isinstance(subkey, str) and 0 < len(subkey) <= MAX_PEER_ID_CHARS and BASE58.issuperset(subkey)


# --- spans (PROTOCOL 2.5) -------------------------------------------------------------------------


@dataclass
class SpanInfo:
    """Blocks [start, end) (global indices) served by one peer, and what it published."""

    start: int
    end: int
    info: ServerInfo = field(repr=False)

    @property
    def state(self) -> ServerState:
        return self.info.state

    @property
    def length(self) -> int:
        return self.end - self.start


def compute_spans(infos: Mapping[int, Mapping[str, ServerInfo]], min_state: ServerState = ServerState.ONLINE) -> dict:
    """Per-peer spans, built like the Petals client's compute_spans.

    `infos` maps each looked-up block index (a contiguous range; a missing index means no servers)
    to {peer id (base58): ServerInfo}. Blocks are walked in order and peers in PeerID order; servers
    below min_state are skipped. A peer's first sighting (or a sighting in a higher state) sets its
    span to that block, or, if it published start_block and end_block, to those clipped to the
    looked-up range; a later sighting in the same state extends the end. Like the client, this trusts
    start_block/end_block. Returns {peer id: SpanInfo} in global block indices.
    """
    if not infos:
        return {}
    first, last = min(infos), max(infos)
    spans: dict[str, SpanInfo] = {}
    for block in range(first, last + 1):
        servers = infos.get(block) or {}
        for peer, info in sorted(servers.items()):
            if info.state < min_state:
                continue
            span = spans.get(peer)
            if span is None or span.state < info.state:
                span = spans[peer] = SpanInfo(block, block + 1, info)
                if info.start_block is not None and info.end_block is not None:
                    span.start = max(info.start_block, first)
                    span.end = min(info.end_block, last + 1)
            elif span.state == info.state:
                span.end = max(span.end, block + 1)
    return spans
