"""The `rpc_info` reply: ExpertInfo.serialized_info (PROTOCOL 3.3).

A msgpack map (hivemind MSGPackSerializer) with the server keys version, dht_client_mode and
cache_tokens_available, plus, when the request named a block, the block's schemas made of
BatchTensorDescriptors (msgpack ext 0x51). The client reads only the compression of
forward_schema[0][0] and inference_schema[0][0], the structure of outputs_schema (a 1-tuple) and
keyword_names (must be empty); the sizes are Petals' nominal placeholders.

Encoded here byte for byte as hivemind encodes it, without torch or hivemind: a frontend answers
rpc_info on its event loop, and importing torch there took a second per frontend on the first call.
Decoding (for our client and tests) does use hivemind's BatchTensorDescriptor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import msgpack

from protocol.wire import DESCRIPTOR_EXT, TUPLE_EXT

SERVER_KEYS = ("version", "dht_client_mode", "cache_tokens_available")
BLOCK_KEYS = ("forward_schema", "outputs_schema", "keyword_names", "inference_schema")
NOMINAL_BATCH_SHAPE = (1, 2048)  # Petals' placeholder (batch-less) shape before hidden_size; unused by clients
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


@dataclass(frozen=True)
class Descriptor:
    """A hivemind BatchTensorDescriptor as a server sends it: strided, on no device, no gradient."""

    size: tuple  # (None, *dims): the batch dimension is left open
    dtype: str  # "torch.float32"
    compression: int = 0  # runtime.proto CompressionType

    def fields(self) -> dict:
        """What BatchTensorDescriptor.packb writes, in its order."""
        return {
            "size": self.size,
            "dtype": self.dtype,
            "layout": "torch.strided",
            "requires_grad": False,
            "pin_memory": False,
            "compression": self.compression,
            "device_type": None,
            "device_index": None,
        }


def block_schemas(hidden_size: int, dtype: str, compression: int = 0) -> dict:
    """The block keys of rpc_info for a block of width hidden_size computing in `dtype` ("bfloat16" or
    "torch.bfloat16"); `compression` (a CompressionType value) is what clients will use for inputs."""
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
        raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
    if isinstance(compression, bool) or compression not in range(6):
        raise ValueError(f"unknown compression type {compression!r}")
    name = dtype.removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    hidden = Descriptor((None, *NOMINAL_BATCH_SHAPE, hidden_size), f"torch.{name}", compression)
    prompts = Descriptor((None,), f"torch.{name}")
    hypo_ids = Descriptor((None,), "torch.int64")
    return {
        "forward_schema": ((hidden,), {}),
        "outputs_schema": (hidden,),
        "keyword_names": (),
        "inference_schema": ((hidden, prompts, hypo_ids), {}),
    }


def _dumps(value: Any) -> bytes:
    """hivemind's MSGPackSerializer.dumps for what rpc_info holds: tuples as ext 0x40, descriptors as 0x51."""
    return msgpack.packb(value, use_bin_type=True, strict_types=True, default=_ext)


def _ext(value: Any) -> msgpack.ExtType:
    if isinstance(value, tuple):
        return msgpack.ExtType(TUPLE_EXT, _dumps(list(value)))
    if isinstance(value, Descriptor):
        return msgpack.ExtType(DESCRIPTOR_EXT, _dumps(value.fields()))
    raise TypeError(f"cannot encode {type(value).__name__} in rpc_info")


def encode_rpc_info(
    *, version: str, dht_client_mode: bool, cache_tokens_available: int, block: Optional[dict]
) -> bytes:
    """ExpertInfo.serialized_info; `block` is block_schemas(...) when the request named a block, else None."""
    if not isinstance(version, str):
        raise TypeError(f"version must be a str, got {type(version).__name__}")
    if not isinstance(dht_client_mode, bool):
        raise TypeError(f"dht_client_mode must be a bool, got {type(dht_client_mode).__name__}")
    if isinstance(cache_tokens_available, bool) or not isinstance(cache_tokens_available, int):
        raise TypeError(f"cache_tokens_available must be an int, got {type(cache_tokens_available).__name__}")
    if cache_tokens_available < 0:
        raise ValueError(f"cache_tokens_available must be >= 0, got {cache_tokens_available}")
    info = {"version": version, "dht_client_mode": dht_client_mode, "cache_tokens_available": cache_tokens_available}
    if block is not None:
        clash = set(block) & set(info)
        if clash:
            raise ValueError(f"block info may not override the server keys {sorted(clash)}")
        info.update(block)
    return _dumps(info)


def decode_rpc_info(serialized_info: bytes) -> dict:
    """The other way, for our own client and tests: a dict holding BatchTensorDescriptors.

    Decoded with wire.safe_loads (a nesting limit) rather than MSGPackSerializer.loads, which a
    hostile peer can crash with deeply nested tuples."""
    from protocol.wire import safe_loads

    try:
        info = safe_loads(serialized_info, descriptors=True)
    except Exception as e:
        raise ValueError(f"rpc_info is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(info, dict):
        raise ValueError(f"rpc_info must be a msgpack map, got {type(info).__name__}")
    return info
