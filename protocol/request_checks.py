"""Petals RPC requests, checked: which blocks, which tensors, which options (PROTOCOL 3.1-3.7).

Pure functions from protobufs to plain values, used by the frontends: every check that needs only the
request's shapes, dtypes, lengths and numbers is made here, once, before anything reaches the runtime
(which checks only what needs tensor values or the cache: node/runtime/checks.py). Every problem
raises ValueError (or KeyError for an unknown adapter, like Petals) with a message that tells the
client what was wrong.

A request is read in one call, in one order: its metadata and headers are checked, then (only if they
pass) its tensors' buffers are read and decompressed. `forward_request` and `backward_request` read
rpc_forward's and rpc_backward's, `session_open` the first message of rpc_inference, `inference_step`
every later one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from protocol import wire
from protocol.plan import NodePlan
from protocol.wire import RawTensor

COMPRESSION_VALUES = range(len(wire.COMPRESSION_NAMES))  # runtime.proto CompressionType: NONE .. BLOCKWISE_8BIT


@dataclass
class Span:
    """The blocks a request runs through, global indices [start, end)."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def parse_span(uid: str, dht_prefix: str, served_start: int, served_end: int) -> Span:
    indices = wire.parse_chain(uid, dht_prefix)
    wire.check_served(indices, served_start, served_end, uid)
    return Span(indices[0], indices[-1] + 1)


MAX_TENSORS = 8  # a request needs at most 3 (hidden states or inputs, gradients, prompts, hypo_ids)


@dataclass(frozen=True)
class Declared:
    """A request's tensor as its header declares it, before its buffer is read: the checks of this module
    need only dtype and shape, and `decode` reads the buffers of the arguments that passed them."""

    dtype: str
    shape: tuple[int, ...]
    proto: Any  # the runtime_pb2.Tensor
    index: int  # its position in the request, for error messages


def declared_tensors(protos: Sequence) -> list[Declared]:
    """The request's tensors, their headers checked (known dtype and compression, sane shape)."""
    if len(protos) > MAX_TENSORS:
        raise ValueError(f"a request carries at most {MAX_TENSORS} tensors, got {len(protos)}")
    out = []
    for i, proto in enumerate(protos):
        try:
            dtype, shape = wire.check_header(proto)
        except ValueError as e:
            raise ValueError(f"tensor {i}: {e}") from None
        out.append(Declared(dtype, shape, proto, i))
    return out


def decode(*args: Declared) -> list[RawTensor]:
    """The arguments' tensors, read and decompressed once their declared shapes passed the checks."""
    out = []
    for arg in args:
        try:
            out.append(wire.decode_tensor(arg.proto))
        except ValueError as e:
            raise ValueError(f"tensor {arg.index}: {e}") from None
    return out


def positional(
    tensors: list[Declared], metadata: dict, structure: Any = None, *, names: Sequence[str]
) -> list[Declared]:
    """The first len(names) positional arguments, via `args_structure` when the client sent one."""
    if structure is None:
        structure = metadata.get("args_structure")
    args = wire.resolve_args(tensors, structure)
    if len(args) < len(names):
        raise ValueError(f"expected {len(names)} tensors ({', '.join(names)}), got {len(args)}")
    for name, arg in zip(names, args):
        if not isinstance(arg, Declared):
            raise ValueError(f"argument {name} must be a tensor, but args_structure puts a {type(arg).__name__} there")
    return list(args[: len(names)])


def check_points(metadata: dict) -> float:
    points = metadata.get("points", 0.0)
    if isinstance(points, bool) or not isinstance(points, (int, float)) or not math.isfinite(points):
        raise ValueError(f"points must be a number, got {points!r}")
    return float(points)


def active_adapter(metadata: dict, adapters: Sequence[str]) -> str:
    name = metadata.get("active_adapter")
    if name in (None, ""):
        return ""
    if not isinstance(name, str):
        raise ValueError(f"active_adapter must be a string, got {type(name).__name__}")
    if name not in adapters:
        raise KeyError(f"adapter {name} not found")
    return name


def output_compression(metadata: dict, n_outputs: int, default: int) -> list[int]:
    value = metadata.get("output_compression")
    if value is None:
        return [default] * n_outputs
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"output_compression must be a list of compression type numbers, got {value!r}")
    if any(v not in COMPRESSION_VALUES for v in value):
        raise ValueError(f"output_compression has an unknown compression type: {list(value)}")
    if len(value) != n_outputs:
        raise ValueError(f"output_compression has {len(value)} entries for {n_outputs} outputs")
    return list(value)


ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")  # what clients send; float64 would only cost memory


def floating(tensor: Declared, name: str) -> None:
    if not tensor.dtype.startswith(("float", "bfloat")):
        raise ValueError(f"{name} must be a floating point tensor, got {tensor.dtype}")
    if tensor.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"{name} must be {', '.join(ACTIVATION_DTYPES)}, got {tensor.dtype}")


def hidden_shape(tensor: Declared, name: str, hidden_size: int, max_tokens: int) -> tuple[int, int]:
    """Check a [batch, length, hidden] tensor; return (batch, length)."""
    if len(tensor.shape) != 3 or tensor.shape[2] != hidden_size:
        raise ValueError(f"{name} must have shape [batch, length, {hidden_size}], got {list(tensor.shape)}")
    floating(tensor, name)
    batch, length = tensor.shape[0], tensor.shape[1]
    if batch * length > max_tokens:
        raise ValueError(
            f"Task size greater than max_batch_size ({batch * length} > {max_tokens}): {name} is {list(tensor.shape)}"
        )
    return batch, length


def grad_outputs(tensor: Declared, inputs: Declared) -> None:
    if tuple(tensor.shape) != tuple(inputs.shape):
        raise ValueError(f"grad_outputs has shape {list(tensor.shape)}, expected {list(inputs.shape)} like inputs")
    floating(tensor, "grad_outputs")


def prompts(tensor: Optional[Declared], n_blocks: int, batch: int, length: int, hidden_size: int) -> None:
    """Deep prompts: [n_blocks, 1 or batch, prefix, hidden] covering at most the input's positions, or
    the empty placeholder."""
    if optional_tensor(tensor) is None:
        return
    shape = tuple(tensor.shape)
    if len(shape) != 4 or shape[0] != n_blocks or shape[1] not in (1, batch) or shape[3] != hidden_size:
        raise ValueError(
            f"prompts must have shape [{n_blocks}, 1 or {batch}, prefix, {hidden_size}], got {list(shape)}"
        )
    if shape[2] > length:
        raise ValueError(f"prompts cover {shape[2]} positions but the input has only {length}")
    floating(tensor, "prompts")


def hypo_ids(tensor: Optional[Declared], batch: int) -> None:
    """Beam search's reordering: [batch] int64, or the empty placeholder (the runtime checks the range)."""
    if optional_tensor(tensor) is None:
        return
    if tensor.dtype != "int64":
        raise ValueError(f"hypo_ids must be int64, got {tensor.dtype}")
    if tuple(tensor.shape) != (batch,):
        raise ValueError(f"hypo_ids must have shape [{batch}], got {list(tensor.shape)}")


def max_length(position: int, length: int, limit: int) -> None:
    if position + length > limit:
        raise ValueError(f"Maximum length exceeded: prefix {position} + current {length} > max_length {limit}")


@dataclass
class SessionOpen:
    """What the first message of rpc_inference fixes for the whole session."""

    span: Span
    session_id: str
    max_length: int
    batch: int
    alloc_timeout: float
    args_structure: Any
    adapter: str


def session_open(request, metadata: dict, plan: NodePlan) -> SessionOpen:
    span = parse_span(request.uid, plan.dht_prefix, plan.start_block, plan.end_block)
    inference_max_length, max_batch_size = plan.inference_max_length, plan.max_batch_size
    max_length = metadata.get("max_length")
    if max_length is None:
        raise ValueError("the first inference message must set max_length")
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise TypeError(f"max_length must be an int, got {type(max_length).__name__} {max_length!r}")
    if max_length < 1:  # a session of no tokens would hold a slot and no cache: nothing to admit it by
        raise ValueError(f"Cannot allocate KV cache for {max_length} tokens: max_length must be at least 1")
    if max_length > inference_max_length:
        raise ValueError(f"Cannot allocate KV cache for {max_length} tokens, max = {inference_max_length}")
    session_id = identifier(metadata, "session_id") or ""
    alloc_timeout = metadata.get("alloc_timeout", 0.0)
    if isinstance(alloc_timeout, bool) or not isinstance(alloc_timeout, (int, float)) or not alloc_timeout >= 0:
        raise ValueError(f"alloc_timeout must be a non-negative number, got {alloc_timeout!r}")
    check_points(metadata)
    adapter = active_adapter(metadata, plan.adapters)
    batch = request.tensors[0].size[0] if request.tensors and len(request.tensors[0].size) > 0 else 1
    if not 1 <= batch <= max_batch_size:
        raise ValueError(f"a session's batch size must be from 1 to {max_batch_size}, got {batch}")
    return SessionOpen(
        span, session_id, max_length, batch, float(alloc_timeout), metadata.get("args_structure"), adapter
    )


def start_from_position(metadata: dict, prefix_length: int) -> int:
    """Rollback: the cache position to continue from (PROTOCOL 3.6 step 4.2, checked unlike Petals)."""
    value = metadata.get("start_from_position")
    if value is None:
        return prefix_length
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"start_from_position must be an int, got {value!r}")
    if not 0 <= value <= prefix_length:
        raise ValueError(f"start_from_position {value} is outside the {prefix_length} tokens processed so far")
    return value


MAX_ID_LENGTH = 128  # session and step ids are UUIDs (36 characters), peer ids base58 (about 52)


def identifier(metadata: dict, key: str) -> Optional[str]:
    """A session_id or step_id: a string of at most MAX_ID_LENGTH characters, or None when absent."""
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {type(value).__name__}")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"{key} is {len(value)} characters long, at most {MAX_ID_LENGTH} are allowed")
    return value


def next_servers(metadata: dict, total_blocks: int) -> list[tuple[str, str, int, int]]:
    """v2.2.0 clients' push chain: [(peer_b58, session_id, start, end), ...], each a span of the model's
    blocks, at most one entry per block; malformed entries are errors."""
    value = metadata.get("next_servers")
    if not value:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"next_servers must be a list, got {type(value).__name__}")
    if len(value) > total_blocks:
        raise ValueError(f"next_servers has {len(value)} entries for a model of {total_blocks} blocks")
    out = []
    for entry in value:
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 4
            or not isinstance(entry[0], str)
            or not isinstance(entry[1], str)
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in entry[2:])
        ):
            raise ValueError(f"next_servers entries must be (peer_id, session_id, start, end), got {_short(entry)}")
        peer, session_id, start, end = entry
        if len(peer) > MAX_ID_LENGTH or len(session_id) > MAX_ID_LENGTH:
            raise ValueError(f"next_servers entry has an id longer than {MAX_ID_LENGTH} characters")
        if not 0 <= start < end <= total_blocks:
            raise ValueError(f"next_servers entry spans blocks {start}:{end}, outside the model's 0:{total_blocks}")
        out.append((peer, session_id, start, end))
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


MAX_EMPTY_EXTENT = 1 << 32  # what the other dimensions of an empty tensor may multiply to


def optional_tensor(tensor):
    """Petals sends an empty tensor for an absent argument. Its other dimensions are bounded still: torch
    cannot even describe an empty tensor of (0, 2**31 - 1, 2**31 - 1, 2**31 - 1) (its strides overflow)."""
    if tensor is None:
        return None
    n, extent = 1, 1
    for d in tensor.shape:
        n *= d
        extent *= max(d, 1)
    if n == 0 and extent > MAX_EMPTY_EXTENT:
        raise ValueError(f"an empty tensor of shape {list(tensor.shape)}: its other dimensions are absurd")
    return None if n == 0 else tensor


# --- whole requests ---------------------------------------------------------------------------------


@dataclass
class BlocksCall:
    """An rpc_forward or rpc_backward request, checked and decoded."""

    span: Span
    points: float
    adapter: str
    tensors: list[RawTensor]  # forward: hidden_states, prompts; backward: inputs, grad_outputs, prompts
    compressions: list[int]  # one per output


def forward_request(uid: str, protos: Sequence, metadata: dict, plan: NodePlan) -> BlocksCall:
    span = parse_span(uid, plan.dht_prefix, plan.start_block, plan.end_block)
    points = check_points(metadata)
    adapter = active_adapter(metadata, plan.adapters)
    hidden, prompts_ = positional(declared_tensors(protos), metadata, names=("hidden_states", "prompts"))
    batch, length = hidden_shape(hidden, "hidden_states", plan.hidden_size, plan.max_batch_size)
    prompts(prompts_, span.length, batch, length, plan.hidden_size)
    tensors = decode(hidden, prompts_)
    return BlocksCall(span, points, adapter, tensors, output_compression(metadata, 1, plan.compression))


def backward_request(uid: str, protos: Sequence, metadata: dict, plan: NodePlan) -> BlocksCall:
    span = parse_span(uid, plan.dht_prefix, plan.start_block, plan.end_block)
    points = check_points(metadata)
    adapter = active_adapter(metadata, plan.adapters)
    inputs, grads, prompts_ = positional(
        declared_tensors(protos), metadata, names=("inputs", "grad_outputs", "prompts")
    )
    batch, length = hidden_shape(inputs, "inputs", plan.hidden_size, plan.max_batch_size)
    grad_outputs(grads, inputs)
    prompts(prompts_, span.length, batch, length, plan.hidden_size)
    tensors = decode(inputs, grads, prompts_)
    n_outputs = 1 if optional_tensor(prompts_) is None else 2  # grad_inputs, and grad_prompts when sent
    return BlocksCall(span, points, adapter, tensors, output_compression(metadata, n_outputs, plan.compression))


@dataclass
class InferenceStep:
    """One step of an open session, checked and decoded."""

    step_id: str  # "" when the client sent none
    position: int  # cached tokens kept before this step (smaller than before: a rollback)
    next_servers: list[tuple[str, str, int, int]]
    hidden: RawTensor
    prompts: RawTensor  # the empty placeholder when absent, as sent
    hypo_ids: RawTensor  # likewise

    @property
    def length(self) -> int:
        return self.hidden.shape[1]

    @property
    def tensors(self) -> list[RawTensor]:
        return [self.hidden, self.prompts, self.hypo_ids]


def inference_step(request, metadata: dict, opened: "SessionOpen", prefix: int, plan: NodePlan) -> InferenceStep:
    """A step of the session `opened`, which has processed `prefix` tokens so far."""
    step_id = identifier(metadata, "step_id") or ""
    position = start_from_position(metadata, prefix)
    servers = next_servers(metadata, plan.total_blocks)
    hidden, prompts_, hypo_ids_ = positional(
        declared_tensors(request.tensors),
        metadata,
        opened.args_structure,
        names=("hidden_states", "prompts", "hypo_ids"),
    )
    batch, length = hidden_shape(hidden, "hidden_states", plan.hidden_size, plan.max_batch_size)
    if batch != opened.batch:
        raise ValueError(f"hidden_states has batch size {batch}, but the session was opened with {opened.batch}")
    prompts(prompts_, opened.span.length, batch, length, plan.hidden_size)
    hypo_ids(hypo_ids_, batch)
    max_length(position, length, opened.max_length)
    return InferenceStep(step_id, position, servers, *decode(hidden, prompts_, hypo_ids_))
