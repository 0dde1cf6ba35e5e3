"""Petals wire formats: tensors, metadata, args_structure and block uids as they travel between peers.

Pure functions, no I/O (PROTOCOL 1.5, 1.6, 3.1, 3.2). Every problem with what a peer sent raises
ValueError with a message that names what was wrong.

Inside the node a tensor is a RawTensor (dtype name, shape, raw little-endian row-major bytes), so that
messages can be checked, routed and re-encoded without torch. torch and hivemind are imported lazily,
only by the functions that need them: importing any hivemind module runs `hivemind/__init__`, which
imports torch and most of hivemind (about 2 s), and this module must stay cheap to import.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

# runtime.proto CompressionType: the names --compression takes, and their numbers (the index) on the wire.
# The one list of them in the node (the flags, the plan and the request checks read it from here).
COMPRESSION_NAMES = ("NONE", "MEANSTD_16BIT", "FLOAT16", "QUANTILE_8BIT", "UNIFORM_8BIT", "BLOCKWISE_8BIT")
NONE, MEANSTD_16BIT, FLOAT16, QUANTILE_8BIT, UNIFORM_8BIT, BLOCKWISE_8BIT = range(len(COMPRESSION_NAMES))

# torch dtype name (without "torch.") -> bytes per value, on the wire and in memory (bfloat16: the efficient
# 2-byte form). The one table of dtype sizes in the node, torch-free so that the supervisor may read it.
ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})

MAX_NDIM = 32  # torch's own limit is 64; no Petals tensor has more than 4 dimensions
MAX_DIM = 2**31 - 1  # one dimension this long already needs a multi-GiB buffer
STREAM_CHUNK_BYTES = 4 * 1024 * 1024  # hivemind's DEFAULT_MAX_MSG_SIZE, what Petals streams with

UID_DELIMITER = "."
CHAIN_DELIMITER = " "


# --- lazy imports (see the module docstring) ----------------------------------------------------


def _pb():
    """hivemind.proto.runtime_pb2 (imports torch and hivemind on first use)."""
    mod = sys.modules.get("hivemind.proto.runtime_pb2")
    if mod is None:
        from hivemind.proto import runtime_pb2 as mod
    return mod


def _msgpack_serializer():
    from hivemind.utils.serializer import MSGPackSerializer

    return MSGPackSerializer


_torch_ready = False


def _torch():
    global _torch_ready
    import torch

    if not _torch_ready:
        import warnings

        # Tensors made by to_torch() view the message's read-only bytes; they are read, never written
        # (callers that write in place clone first), so torch's warning about it is noise.
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        _torch_ready = True
    return torch


# --- tensors ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawTensor:
    """A tensor without torch: dtype name (e.g. "float32", "bfloat16"), shape, raw row-major bytes.

    `data` is bytes or any buffer (memoryview, numpy array) holding exactly numel * itemsize bytes,
    little-endian; bfloat16 is always 2 bytes per value.
    """

    dtype: str
    shape: tuple[int, ...]
    data: Any = field(repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    def tobytes(self) -> bytes:
        return self.data if type(self.data) is bytes else memoryview(self.data).tobytes()


def _describe(dtype: str, shape: Sequence[int]) -> str:
    return f"{dtype}{list(shape)}"


def _buffer_nbytes(data: Any) -> int:
    if type(data) is bytes:
        return len(data)
    return memoryview(data).nbytes


def _check_shape(shape: Sequence[int], dtype: str) -> int:
    """Validates a shape; returns its number of elements."""
    if len(shape) > MAX_NDIM:
        raise ValueError(f"tensor has {len(shape)} dimensions, at most {MAX_NDIM} are allowed")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int):
            raise ValueError(f"shape {list(shape)} has a non-integer dimension {d!r}")
        if d < 0:
            raise ValueError(f"shape {_describe(dtype, shape)} has a negative dimension")
        if d > MAX_DIM:
            raise ValueError(f"shape {_describe(dtype, shape)} has an absurd dimension {d} (max {MAX_DIM})")
    return math.prod(shape)


def _check_dtype(dtype: str) -> None:
    if dtype not in ITEMSIZE:
        raise ValueError(f"unsupported dtype {dtype!r} (expected one of {', '.join(ITEMSIZE)})")


def check_raw(raw: RawTensor) -> None:
    """Raises ValueError unless the RawTensor is consistent (known dtype, sane shape, right byte count)."""
    _check_dtype(raw.dtype)
    numel = _check_shape(raw.shape, raw.dtype)
    have, expected = _buffer_nbytes(raw.data), numel * ITEMSIZE[raw.dtype]
    if have != expected:
        raise ValueError(f"buffer has {have} bytes, expected {expected} for {_describe(raw.dtype, raw.shape)}")


def decode_tensor(t, label: Optional[str] = None) -> RawTensor:
    """runtime_pb2.Tensor -> RawTensor.

    Compression NONE is decoded without torch and without copying the buffer (beyond the one copy
    protobuf makes when `t.buffer` is read, which is why it is read once). The legacy bfloat16 form
    (values upcast to 4-byte float32, told apart by len == numel * 4) is converted to 2-byte bfloat16,
    rounding like hivemind does. Other compressions go through hivemind's deserializer.
    `label` (e.g. "tensor 1") prefixes error messages.
    """
    try:
        return _decode_tensor(t)
    except ValueError as e:
        if label:
            raise ValueError(f"{label}: {e}") from None
        raise


def check_header(t) -> tuple[str, tuple[int, ...]]:
    """A runtime_pb2.Tensor's declared dtype and shape, checked without reading its buffer."""
    if t.compression not in range(len(COMPRESSION_NAMES)):
        raise ValueError(f"unknown compression type {t.compression}")
    dtype = t.dtype
    if not dtype:
        raise ValueError("tensor has no dtype (a stream continuation part cannot be decoded on its own)")
    _check_dtype(dtype)
    shape = tuple(t.size)
    _check_shape(shape, dtype)
    return dtype, shape


def _decode_tensor(t) -> RawTensor:
    compression = t.compression
    dtype, shape = check_header(t)
    numel = math.prod(shape)
    if compression != NONE:
        return _decode_compressed(t, dtype, shape)

    buffer = t.buffer  # upb copies the bytes on every access: read it once
    expected = numel * ITEMSIZE[dtype]
    if len(buffer) == expected:
        return RawTensor(dtype, shape, buffer)
    if dtype == "bfloat16" and len(buffer) == numel * 4:
        return RawTensor(dtype, shape, _bf16_from_fp32(buffer))
    extra = f" (or {numel * 4} in the legacy float32 form)" if dtype == "bfloat16" else ""
    raise ValueError(f"buffer has {len(buffer)} bytes, expected {expected}{extra} for {_describe(dtype, shape)}")


def _bf16_from_fp32(buffer: bytes) -> bytes:
    torch = _torch()
    values = torch.frombuffer(buffer, dtype=torch.float32).to(torch.bfloat16)
    return values.view(torch.int16).numpy().tobytes()


def _decode_compressed(t, dtype: str, shape: tuple) -> RawTensor:
    name = COMPRESSION_NAMES[t.compression]
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} compression applies to floating point tensors, not {dtype}")
    if t.compression in (FLOAT16, MEANSTD_16BIT):  # checked before hivemind converts what it was given
        numel = math.prod(shape)
        stats = 0 if t.compression == FLOAT16 else 2 * 4 * (numel // shape[-1] if shape and shape[-1] else 0)
        nbytes, expected = len(t.buffer), 2 * numel + stats
        if nbytes != expected:
            raise ValueError(f"{name} tensor {_describe(dtype, shape)} needs {expected} bytes, got {nbytes}")
    try:
        if t.compression in (QUANTILE_8BIT, UNIFORM_8BIT, BLOCKWISE_8BIT):
            tensor = _dequantize(t.buffer, t.compression, dtype, shape)
        else:
            from hivemind.compression.serialization import deserialize_torch_tensor

            tensor = deserialize_torch_tensor(t)
    except ValueError as e:
        raise ValueError(f"cannot decode {name} tensor {_describe(dtype, shape)}: {e}") from None
    except Exception as e:  # numpy/torch errors on a malformed buffer
        raise ValueError(f"cannot decode {name} tensor {_describe(dtype, shape)}: {type(e).__name__}: {e}") from None
    if tuple(tensor.shape) != shape:  # defensive: both decoders reshape to `shape` today
        raise ValueError(f"{name} tensor decoded to shape {list(tensor.shape)}, expected {list(shape)}")
    return from_torch(tensor)


BLOCKWISE_BLOCK = 4096  # hivemind's _BLOCKWISE_QUANTIZATION_BLOCKSIZE


def _dequantize(buffer: bytes, compression: int, dtype: str, shape: tuple):
    """The 8-bit formats of PROTOCOL 3.2, decoded here rather than by hivemind: hivemind 1.1.12 reads
    their int64 headers with int(<1-element array>), which numpy >= 2.4 refuses (TypeError), so its
    own decoder cannot read them in this environment. Same arithmetic: codebook (cast to the dtype)
    indexed by the uint8 codes; blockwise: float32 code[q] * absmax[block of 4096], then cast.

      QUANTILE_8BIT / UNIFORM_8BIT: int64 n, float32 codebook[n], uint8 codes[numel]
      BLOCKWISE_8BIT: int64 n_absmax, int64 n_code, float32 absmax[n_absmax], float32 code[n_code], uint8 codes[numel]
    """
    import numpy as np

    torch = _torch()
    numel = math.prod(shape)
    counts_len = 16 if compression == BLOCKWISE_8BIT else 8
    if len(buffer) < counts_len:
        raise ValueError(f"buffer of {len(buffer)} bytes is too short for its header")
    counts = [int(x) for x in np.frombuffer(buffer, dtype="<i8", count=counts_len // 8)]
    expected = counts_len + 4 * sum(counts) + numel
    if any(c < 0 for c in counts):
        raise ValueError(f"header has negative table lengths {counts}")
    if len(buffer) != expected:
        raise ValueError(f"buffer has {len(buffer)} bytes, its header {counts} implies {expected}")
    tables = []
    offset = counts_len
    for c in counts:
        tables.append(torch.from_numpy(np.frombuffer(buffer, dtype="<f4", count=c, offset=offset).copy()))
        offset += 4 * c
    codes = torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8, count=numel, offset=offset).astype(np.int64))
    codebook = tables[-1]
    if numel and int(codes.max()) >= len(codebook):
        raise ValueError(f"code {int(codes.max())} is outside the codebook of {len(codebook)} values")
    target = getattr(torch, dtype)
    if compression != BLOCKWISE_8BIT:
        return codebook.to(target)[codes].reshape(shape)
    absmax = tables[0]
    blocks = -(-numel // BLOCKWISE_BLOCK)
    if len(absmax) != blocks:
        raise ValueError(f"{len(absmax)} absmax values for {blocks} blocks of {BLOCKWISE_BLOCK}")
    scale = absmax.repeat_interleave(BLOCKWISE_BLOCK)[:numel]
    return (codebook[codes] * scale).to(target).reshape(shape)


def encode_tensor(raw: RawTensor, compression: int = NONE):
    """RawTensor -> runtime_pb2.Tensor.

    NONE is encoded without torch; bfloat16 goes out in the efficient 2-byte form (like Petals, which
    sets USE_LEGACY_BFLOAT16 = False). Other compressions go through hivemind's serializer.
    requires_grad is always false, as in everything Petals sends.
    """
    if isinstance(compression, bool) or compression not in range(len(COMPRESSION_NAMES)):
        raise ValueError(f"unknown compression type {compression!r}")
    check_raw(raw)
    pb = _pb()
    if compression == NONE:
        data = raw.data if type(raw.data) is bytes else memoryview(raw.data).tobytes()  # protobuf takes bytes only
        return pb.Tensor(buffer=data, size=raw.shape, dtype=raw.dtype, compression=NONE)
    name = COMPRESSION_NAMES[compression]
    if raw.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} compression applies to floating point tensors, not {raw.dtype}")
    try:
        from hivemind.compression.serialization import serialize_torch_tensor

        return serialize_torch_tensor(to_torch(raw), compression)
    except Exception as e:
        raise ValueError(
            f"cannot encode {_describe(raw.dtype, raw.shape)} with {name}: {type(e).__name__}: {e}"
        ) from None


def to_torch(raw: RawTensor):
    """A torch.Tensor viewing raw.data (no copy; read-only when data is bytes: clone before writing)."""
    check_raw(raw)
    torch = _torch()
    dtype = getattr(torch, raw.dtype)
    if raw.numel == 0:
        return torch.empty(raw.shape, dtype=dtype)
    data = raw.data
    if type(data) is not bytes:
        data = memoryview(data).cast("B")
    return torch.frombuffer(data, dtype=dtype).reshape(raw.shape)


def from_torch(tensor) -> RawTensor:
    """A RawTensor viewing a (CPU, contiguous) tensor's memory; copies only to make it so."""
    torch = _torch()
    tensor = tensor.detach()
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in ITEMSIZE:
        raise ValueError(f"unsupported dtype {name!r} (expected one of {', '.join(ITEMSIZE)})")
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    shape = tuple(tensor.shape)
    if tensor.numel() == 0:
        return RawTensor(name, shape, b"")
    # the memoryview keeps the numpy array alive, which keeps the tensor's storage alive
    return RawTensor(name, shape, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


# --- streaming (PROTOCOL 3.2) -------------------------------------------------------------------


def split_for_stream(t, chunk_bytes: int = STREAM_CHUNK_BYTES) -> list:
    """Cut one serialized tensor into stream parts, as hivemind's split_for_streaming does.

    The first part carries the header (compression, size, dtype, requires_grad) with `chunks` = the
    number of parts (0 for an empty buffer) and the first chunk_bytes of the buffer; each further part
    carries only the next chunk_bytes of the buffer.
    """
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    if not t.dtype:
        raise ValueError("cannot stream a tensor without a dtype: the receiver would take it for a continuation part")
    pb = _pb()
    buffer = t.buffer
    n = len(buffer)
    num_chunks = -(-n // chunk_bytes)
    view = memoryview(buffer)
    first = pb.Tensor(
        compression=t.compression,
        buffer=buffer if n <= chunk_bytes else view[:chunk_bytes].tobytes(),
        chunks=num_chunks,
        size=t.size,
        dtype=t.dtype,
        requires_grad=t.requires_grad,
    )
    parts = [first]
    for start in range(chunk_bytes, n, chunk_bytes):
        parts.append(pb.Tensor(buffer=view[start : start + chunk_bytes].tobytes()))
    return parts


class StreamAssembler:
    """Reassembles tensors from the `tensors` of successive stream messages.

    A part with a non-empty dtype starts a new tensor; any other part appends its buffer to the
    current one. A tensor is complete once it has max(chunks, 1) parts: senders that split (the
    *_stream handlers) set chunks, those that do not (rpc_inference, chunks = 0) send whole tensors.
    """

    def __init__(self, max_tensor_bytes: Optional[int] = None) -> None:
        self.max_tensor_bytes = max_tensor_bytes  # None: no limit on one reassembled buffer
        self._header = None
        self._buffers: list = []
        self._size = 0
        self._expected = 0
        self._count = 0  # tensors started so far

    @property
    def pending(self) -> bool:
        """True while a tensor has been started but not all of its parts have arrived."""
        return self._header is not None

    def feed(self, parts: Iterable) -> list:
        """Feeds one message's parts; returns the tensors they complete, in order."""
        done = []
        for part in parts:
            if part.dtype:
                if self._header is not None:
                    raise ValueError(self._incomplete_message() + " when the next tensor began")
                if part.chunks < 0:
                    raise ValueError(f"tensor {self._count}: negative chunk count {part.chunks}")
                self._count += 1
                if part.chunks <= 1:
                    done.append(part)
                else:
                    buffer = part.buffer
                    self._header, self._buffers, self._expected = part, [buffer], part.chunks
                    self._size = len(buffer)
            else:
                if self._header is None:
                    if self._count == 0:
                        raise ValueError("stream part without a dtype before any tensor header")
                    raise ValueError(f"stream part without a dtype after tensor {self._count - 1} was already complete")
                buffer = part.buffer
                self._size += len(buffer)
                if self.max_tensor_bytes is not None and self._size > self.max_tensor_bytes:
                    raise ValueError(f"tensor {self._count - 1} exceeds {self.max_tensor_bytes} bytes")
                self._buffers.append(buffer)
                if len(self._buffers) == self._expected:
                    done.append(self._combine())
        return done

    def finish(self) -> None:
        """Call at the end of the stream: raises ValueError if a tensor is still incomplete."""
        if self._header is not None:
            raise ValueError(self._incomplete_message() + " at the end of the stream")

    def _incomplete_message(self) -> str:
        return f"tensor {self._count - 1} is incomplete: {len(self._buffers)} of {self._expected} parts received"

    def _combine(self):
        h = self._header
        combined = _pb().Tensor(
            buffer=b"".join(self._buffers),
            size=h.size,
            requires_grad=h.requires_grad,
            dtype=h.dtype,
            compression=h.compression,
            chunks=h.chunks,
        )
        self._header, self._buffers, self._expected, self._size = None, [], 0, 0
        return combined


# --- metadata (PROTOCOL 1.6, 3.1) ---------------------------------------------------------------


MAX_MSGPACK_DEPTH = 16  # tuples inside tuples; Petals' metadata nests 3 deep at most
TUPLE_EXT, DESCRIPTOR_EXT = 0x40, 0x51


def safe_loads(data: bytes, *, descriptors: bool = False) -> Any:
    """hivemind's MSGPackSerializer.loads, with a limit on how deeply tuples may nest.

    Every ext-0x40 tuple is decoded by a nested msgpack.unpackb call that takes tens of KiB of C
    stack, so MSGPackSerializer.loads of a value nesting ~200 tuples (under 1 KiB of input) overflows
    the stack and kills the process with SIGSEGV. Here nesting beyond MAX_MSGPACK_DEPTH raises
    ValueError instead. Tuples decode to tuples, lists to lists, as with MSGPackSerializer;
    BatchTensorDescriptors (ext 0x51) are decoded only if `descriptors` is set (rpc_info), any other
    ext type comes back as a msgpack.ExtType (hivemind would return its raw payload bytes).
    """
    import msgpack

    depth = 0

    def hook(code: int, payload: bytes) -> Any:
        nonlocal depth
        if code != TUPLE_EXT and not (descriptors and code == DESCRIPTOR_EXT):
            return msgpack.ExtType(code, payload)
        depth += 1
        if depth > MAX_MSGPACK_DEPTH:
            raise ValueError(f"msgpack value nests more than {MAX_MSGPACK_DEPTH} tuples deep")
        try:
            inner = msgpack.unpackb(payload, ext_hook=hook, raw=False)
        finally:
            depth -= 1
        if code == TUPLE_EXT:
            return tuple(inner)
        from hivemind.utils.tensor_descr import BatchTensorDescriptor  # payload checked above: safe to decode

        return BatchTensorDescriptor.unpackb(payload)

    return msgpack.unpackb(data, ext_hook=hook, raw=False)


MAX_METADATA_BYTES = 64 << 10  # a Petals request's metadata is some hundred bytes (64 next_servers: ~7 KB)


def unpack_metadata(b: bytes) -> dict:
    """ExpertRequest.metadata -> dict (empty bytes -> {}); decodes like hivemind's MSGPackSerializer.
    Refused above MAX_METADATA_BYTES before decoding: msgpack's empty maps and lists are one byte each and
    decode to objects of 50 to 70, so megabytes of them (a request may be that large) took gigabytes."""
    if not b:
        return {}
    if len(b) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata of {len(b)} bytes exceeds the limit of {MAX_METADATA_BYTES}")
    try:
        value = safe_loads(b)
    except Exception as e:  # msgpack raises several types (ExtraData, FormatError, StackError, ValueError, ...)
        raise ValueError(f"metadata is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"metadata must be a msgpack map, got {type(value).__name__}")
    return value


def pack_metadata(d: dict) -> bytes:
    return _msgpack_serializer().dumps(d)


# --- args_structure (PROTOCOL 3.1) --------------------------------------------------------------

_MARK = b"__T"


def resolve_args(tensors: Sequence, args_structure: Any) -> list:
    """The positional arguments of a request: args_structure with each b"__T<i>" leaf replaced by tensors[i].

    args_structure is ((arg0, arg1, ...), {kwargs}); the kwargs are ignored. Positional items may be
    nested tuples or lists of leaves. Without a structure (absent or None) the tensors are the arguments.
    """
    if args_structure is None:
        return list(tensors)
    if not isinstance(args_structure, (tuple, list)) or len(args_structure) != 2:
        raise ValueError(f"args_structure must be a pair (args, kwargs), got {_short(args_structure)}")
    args, kwargs = args_structure
    if not isinstance(args, (tuple, list)):
        raise ValueError(f"args_structure: args must be a tuple, got {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"args_structure: kwargs must be a map, got {type(kwargs).__name__}")
    return [_resolve(item, tensors, 0) for item in args]


def _resolve(item: Any, tensors: Sequence, depth: int) -> Any:
    if isinstance(item, (tuple, list)):
        if depth >= 8:
            raise ValueError("args_structure is nested too deeply")
        return type(item)(_resolve(x, tensors, depth + 1) for x in item)
    if isinstance(item, bytes) and item.startswith(_MARK):
        digits = item[len(_MARK) :]
        if digits.isdigit() and len(digits) <= 9:
            index = int(digits)
            if index >= len(tensors):
                raise ValueError(f"args_structure refers to tensor {index} but the request has {len(tensors)} tensors")
            return tensors[index]
    raise ValueError(f"args_structure leaf {_short(item)} is not a tensor reference b'__T<i>'")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- block uids (PROTOCOL 2.1, 3.1) -------------------------------------------------------------


def parse_chain(uid: str, dht_prefix: str) -> list[int]:
    """Block indices of a uid chain "<prefix>.<i> <prefix>.<i+1> ..." (consecutive, increasing)."""
    if not uid:
        raise ValueError("Remote peer does not serve an empty uid")
    indices = []
    for part in uid.split(CHAIN_DELIMITER):
        if not part:
            raise ValueError(f"uid chain {uid!r} has an empty element: uids must be separated by single spaces")
        prefix, dot, index = part.rpartition(UID_DELIMITER)
        # canonical decimal only: the uid "<prefix>.01" is not the uid "<prefix>.1"
        if prefix != dht_prefix or not dot or not (index.isascii() and index.isdigit()) or str(int(index)) != index:
            raise ValueError(f"Remote peer does not serve {part}")
        indices.append(int(index))
    for prev, cur in zip(indices, indices[1:]):
        if cur != prev + 1:
            raise ValueError(f"blocks of a chain must be consecutive and increasing, got {uid!r}")
    return indices


def check_served(indices: Sequence[int], start: int, end: int, uid: str) -> None:
    """Raises ValueError("Remote peer does not serve <uid>") for the first index outside [start, end)."""
    parts = uid.split(CHAIN_DELIMITER)
    for k, index in enumerate(indices):
        if not start <= index < end:
            name = parts[k] if len(parts) == len(indices) else uid
            raise ValueError(f"Remote peer does not serve {name}")
