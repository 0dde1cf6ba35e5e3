"""The `rpc_info` reply: ExpertInfo.serialized_info (PROTOCOL 3.3).

A msgpack map (hivemind MSGPackSerializer) with the server keys version, dht_client_mode and
cache_tokens_available, plus, when the request named a block, the block's schemas made of
BatchTensorDescriptors (msgpack ext 0x51). The client reads only the compression of
forward_schema[0][0] and inference_schema[0][0], the structure of outputs_schema (a 1-tuple) and
keyword_names (must be empty); the sizes are Petals' nominal placeholders.

hivemind (and with it torch) is imported lazily, on first use: importing any hivemind module runs
`hivemind/__init__`, which takes about 2 s, and the protocol package must stay cheap to import.
"""

from __future__ import annotations

from typing import Optional

SERVER_KEYS = ("version", "dht_client_mode", "cache_tokens_available")
BLOCK_KEYS = ("forward_schema", "outputs_schema", "keyword_names", "inference_schema")
NOMINAL_BATCH_SHAPE = (1, 2048)  # Petals' placeholder (batch-less) shape before hidden_size; unused by clients


def block_schemas(hidden_size: int, dtype: str, compression: int = 0) -> dict:
    """The block keys of rpc_info for a block of width hidden_size computing in `dtype` ("bfloat16" or
    "torch.bfloat16"); `compression` (a CompressionType value) is what clients will use for inputs."""
    import torch
    from hivemind.utils.tensor_descr import BatchTensorDescriptor

    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
        raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
    if isinstance(compression, bool) or compression not in range(6):
        raise ValueError(f"unknown compression type {compression!r}")
    name = dtype.removeprefix("torch.")
    torch_dtype = getattr(torch, name, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")

    hidden = BatchTensorDescriptor(*NOMINAL_BATCH_SHAPE, hidden_size, dtype=torch_dtype, compression=compression)
    prompts = BatchTensorDescriptor(dtype=torch_dtype, compression=0)  # size (None,)
    hypo_ids = BatchTensorDescriptor(dtype=torch.int64, compression=0)
    return {
        "forward_schema": ((hidden,), {}),
        "outputs_schema": (hidden,),
        "keyword_names": (),
        "inference_schema": ((hidden, prompts, hypo_ids), {}),
    }


def encode_rpc_info(
    *, version: str, dht_client_mode: bool, cache_tokens_available: int, block: Optional[dict]
) -> bytes:
    """ExpertInfo.serialized_info; `block` is block_schemas(...) when the request named a block, else None."""
    from hivemind.utils.serializer import MSGPackSerializer

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
    return MSGPackSerializer.dumps(info)


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
