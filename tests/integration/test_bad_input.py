"""Bad input, RPC by RPC: every malformed request gets a clear error, no actor dies, other sessions go on.

Each test is one kind of bad input, parametrized over the RPCs it applies to (rpc_info, rpc_forward,
rpc_backward, rpc_push: unary; rpc_forward_stream, rpc_backward_stream, rpc_inference: streams).
Unary errors reach the client as P2PHandlerError(repr(exception)); stream errors as an error frame,
P2PHandlerError("Failed to call handler ...: <message>"). Each test asserts that the text names the
problem. The autouse `node_healthy` fixture checks after every test that the node kept every actor
(same pids, no restarts), logged no unexpected failure, and still answers a valid forward exactly.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Any, Optional, Sequence

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PHandlerError
from hivemind.proto import runtime_pb2

from protocol import stream_framing as framing
from protocol import wire
from tests.helpers.rpc import (
    BACKWARD,
    CHAIN_RPCS,
    EMPTY,
    INFERENCE,
    MAX_TOKENS,
    NO_HYPO,
    PREFIX,
    STREAMS,
    TENSOR_RPCS,
    TIMEOUT,
    UID,
    UNARY,
    Caller,
    H,
    default_tensors,
    enc,
    hidden,
    kind,
    next_step,
    request,
)
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.timeout(120)  # a backstop: every call below has its own timeout


def combos(cases: dict[str, Sequence[str]]) -> list:
    """(rpc, case) parameters: each case only with the RPCs it applies to."""
    return [pytest.param(rpc, case, id=f"{rpc}-{case}") for case, rpcs in cases.items() for rpc in rpcs]


# --- building requests ------------------------------------------------------------------------------


# --- calling -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caller(micro_client, micro_node) -> Caller:
    return Caller(micro_client, micro_node)


REFERENCE_INPUT = hidden(1, 4, seed=123)


@pytest.fixture(scope="module")
def reference_output(micro_client) -> torch.Tensor:
    return micro_client.forward(REFERENCE_INPUT, 0, 4)


def _actors(node) -> dict:
    return {name: (a["pid"], a["restarts"], a["ready"]) for name, a in node.status["actors"].items()}


# Log lines that mean a request reached a path for unexpected failures, or that a process went down.
ALARMS = ("Traceback", "task failed", "stream handler failed", "actor exited", "actor restarted", "too many restarts")


@pytest.fixture(autouse=True)
def node_healthy(micro_node, micro_client, reference_output):
    """After each test: the same actors (pids, no restarts), no alarm in the log, forward still exact."""
    before = _actors(micro_node)
    assert before and all(restarts == 0 and ready for _, restarts, ready in before.values()), before
    log_offset = micro_node.log_path.stat().st_size
    yield
    out = micro_client.forward(REFERENCE_INPUT, 0, 4)
    assert torch.equal(out, reference_output), "a valid forward after the bad input gives another result"
    assert _actors(micro_node) == before, "an actor died or restarted"
    with open(micro_node.log_path, "rb") as f:
        f.seek(log_offset)
        new_log = f.read().decode(errors="replace")
    alarms = [line for line in new_log.splitlines() if any(a in line for a in ALARMS)]
    assert not alarms, "the node logged unexpected failures:\n" + "\n".join(alarms[:5])


# --- 1. garbage bytes ---------------------------------------------------------------------------------

GARBAGE = b"\xff\xff\xff\xff\xff\x07garbage\x00\x01"  # field 0 / wire type 7: no protobuf parses it


@pytest.mark.parametrize("rpc", UNARY + STREAMS)
def test_garbage_bytes(caller, rpc):
    if rpc in UNARY:
        with pytest.raises(P2PHandlerError) as info:
            caller.run(caller.araw_unary(rpc, GARBAGE))
        text = str(info.value)
        assert "DecodeError" in text and "parsing" in text, text
        return
    frames = caller.run(caller.araw_stream(rpc, framing.MESSAGE + len(GARBAGE).to_bytes(8, "big") + GARBAGE))
    assert frames, "the server closed the stream without an error frame"
    marker, payload = frames[-1]
    assert marker == framing.ERROR and len(frames) == 1, frames
    text = framing.error_text(payload)
    assert text and "malformed ExpertRequest" in text, text


@pytest.mark.parametrize(
    "frame, needle",
    [
        (b"\x07" + (5).to_bytes(8, "big") + b"hello", "malformed stream frame (marker b'\\x07')"),
        (framing.MESSAGE + (2**63).to_bytes(8, "big"), "exceeds the limit"),
        (b"\xee" + (2**64 - 1).to_bytes(8, "big") + b"xyz", "exceeds the limit"),
    ],
    ids=["unknown-marker", "absurd-length", "unknown-marker-absurd-length"],
)
@pytest.mark.parametrize("rpc", STREAMS)
def test_bad_stream_frame(caller, rpc, frame, needle):
    frames = caller.run(caller.araw_stream(rpc, frame))
    assert len(frames) == 1 and frames[0][0] == framing.ERROR, frames
    text = framing.error_text(frames[0][1])
    assert text and needle in text, text


@pytest.mark.parametrize("rpc", STREAMS)
def test_an_error_stream_stays_open_until_its_client_has_closed(caller, rpc):
    """After an error frame the server leaves the closing to the client (who stops reading at an error):
    a stream its server closes may end in a reset that loses the error (node/frontend/streams.py,
    drain_input). The error arrives, nothing follows it, and the stream is still open 0.3 s later."""

    async def call():
        _, reader, writer = await caller.swarm.p2p.call_binary_stream_handler(
            PeerID.from_base58(caller.peer), PREFIX + rpc
        )
        try:
            framing.write_message(writer, request(rpc, uid="micro-llama.x"))
            framing.end_of_stream(writer)
            await writer.drain()
            marker, payload = await asyncio.wait_for(framing.read_frame(reader), TIMEOUT)
            try:
                after = await asyncio.wait_for(reader.read(1), 0.3)
            except asyncio.TimeoutError:
                after = None
            return marker, framing.error_text(payload) if marker == framing.ERROR else payload, after
        finally:
            writer.close()

    marker, text, after = caller.run(call())
    assert marker == framing.ERROR and "does not serve" in text, (marker, text)
    assert after is None, f"the server closed the stream right after its error ({after!r})"


# --- 2. uids ------------------------------------------------------------------------------------------


def _with_uid(rpc: str, uid: str):
    if rpc == "rpc_info":
        return runtime_pb2.ExpertUID(uid=uid)
    return request(rpc, uid=uid)


@pytest.mark.parametrize(
    "uid", ["", "micro-llama.x", "other-model.0", "micro-llama.01", "micro-llama", "micro-llama.0  micro-llama.1"]
)
@pytest.mark.parametrize("rpc", CHAIN_RPCS)
def test_unknown_or_empty_uid(caller, rpc, uid):
    if rpc == "rpc_info" and uid == "":
        # PROTOCOL 3.3: an empty uid asks for the server keys only; that is not an error.
        (info,) = caller.call(rpc, runtime_pb2.ExpertUID(uid=""))
        assert set(wire.unpack_metadata(info.serialized_info)) == {
            "version",
            "dht_client_mode",
            "cache_tokens_available",
        }
        return
    if rpc == "rpc_info" and " " in uid:
        caller.expect_error(rpc, _with_uid(rpc, uid), "one block uid")
        return
    needle = "empty element" if "  " in uid else "does not serve"
    caller.expect_error(rpc, _with_uid(rpc, uid), needle)


@pytest.mark.parametrize(
    "uid, needle",
    [
        ("micro-llama.4", "does not serve micro-llama.4"),
        ("micro-llama.3 micro-llama.4", "does not serve micro-llama.4"),
        ("micro-llama.0 micro-llama.2", "consecutive"),
        ("micro-llama.1 micro-llama.0", "consecutive"),
        ("micro-llama.2 micro-llama.2", "consecutive"),
        ("micro-llama.99999999999999999999", "does not serve"),
    ],
    ids=["past-end", "chain-past-end", "gap", "reversed", "repeated", "huge-index"],
)
@pytest.mark.parametrize("rpc", CHAIN_RPCS)
def test_chain_not_served(caller, rpc, uid, needle):
    if rpc == "rpc_info" and " " in uid:
        needle = "one block uid"
    caller.expect_error(rpc, _with_uid(rpc, uid), needle)


# --- 3. tensors: count, shape, dtype, NaN -------------------------------------------------------------


@pytest.mark.parametrize("variant", ["no-args-structure", "with-args-structure", "none"])
@pytest.mark.parametrize("rpc", TENSOR_RPCS)
def test_wrong_tensor_count(caller, rpc, variant):
    n_expected = 2 if kind(rpc) == "forward" else 3
    tensors = default_tensors(rpc)[: n_expected - 1]
    if variant == "none":
        if rpc == "rpc_inference":
            # an empty first message is the close message (PROTOCOL 3.6): the session ends cleanly
            assert caller.call(rpc, request(rpc, tensors=[])) == []
            return
        tensors = []
    if variant == "with-args-structure":
        caller.expect_error(rpc, request(rpc, tensors=tensors), "args_structure refers to tensor")
    else:
        caller.expect_error(
            rpc, request(rpc, tensors=tensors, drop=["args_structure"]), f"expected {n_expected} tensors"
        )


def _first_name(rpc: str) -> str:
    return "inputs" if kind(rpc) == "backward" else "hidden_states"


SHAPE_CASES = {
    "2d": TENSOR_RPCS,
    "4d": TENSOR_RPCS,
    "hidden-size": TENSOR_RPCS,
    "grad-outputs": BACKWARD,
    "prompts": TENSOR_RPCS,
    "prompts-longer-than-input": TENSOR_RPCS,
    "hypo-ids": INFERENCE,
    "hypo-ids-range": INFERENCE,
    "batch-change": INFERENCE,
}


@pytest.mark.parametrize("rpc, case", combos(SHAPE_CASES))
def test_wrong_shape(caller, rpc, case):
    name = _first_name(rpc)
    tensors = default_tensors(rpc)
    responses_before = 0
    if case == "2d":
        tensors[0] = torch.randn(3, H)
        needle = f"{name} must have shape [batch, length, {H}], got [3, {H}]"
    elif case == "4d":
        tensors[0] = torch.randn(1, 1, 3, H)
        needle = f"{name} must have shape"
    elif case == "hidden-size":
        tensors = default_tensors(rpc, torch.randn(1, 3, H // 2))
        needle = f"{name} must have shape [batch, length, {H}], got [1, 3, {H // 2}]"
    elif case == "grad-outputs":
        tensors[1] = torch.randn(1, 2, H)
        needle = "grad_outputs has shape [1, 2, 64], expected [1, 3, 64]"
    elif case == "prompts":
        tensors[-2 if kind(rpc) == "inference" else -1] = torch.randn(3, 1, 1, H)  # 3 prompts for 4 blocks
        needle = "prompts must have shape [4, 1 or 1, prefix, 64], got [3, 1, 1, 64]"
    elif case == "prompts-longer-than-input":
        tensors[-2 if kind(rpc) == "inference" else -1] = torch.randn(4, 1, 5, H)
        needle = "prompts cover 5 positions but the input has only 3"
    elif case in ("hypo-ids", "hypo-ids-range", "batch-change"):
        if case == "batch-change":
            first = request(rpc)
            steps = [first, next_step(first, [hidden(2, 1), EMPTY, NO_HYPO], start_from_position=3)]
            caller.expect_error(rpc, steps, "batch size 2, but the session was opened with 1", responses_before=1)
            return
        tensors[2] = torch.tensor([0, 0]) if case == "hypo-ids" else torch.tensor([5])
        needle = "hypo_ids must have shape [1], got [2]" if case == "hypo-ids" else "hypo_ids must be in [0, 1)"
    caller.expect_error(rpc, request(rpc, tensors=tensors), needle, responses_before=responses_before)


def _raw(dtype: str, shape: Sequence[int], buffer: bytes) -> runtime_pb2.Tensor:
    return runtime_pb2.Tensor(dtype=dtype, size=list(shape), buffer=buffer, compression=0)


DTYPE_CASES = {
    "int64-hidden": TENSOR_RPCS,
    "bool-hidden": TENSOR_RPCS,
    "unknown-dtype": TENSOR_RPCS,
    "no-dtype": TENSOR_RPCS,
    "short-buffer": TENSOR_RPCS,
    "absurd-dim": TENSOR_RPCS,
    "bad-compression": TENSOR_RPCS,
    "int-prompts": TENSOR_RPCS,
    "float-hypo-ids": INFERENCE,
}


@pytest.mark.parametrize("rpc, case", combos(DTYPE_CASES))
def test_wrong_dtype(caller, rpc, case):
    name = _first_name(rpc)
    tensors = default_tensors(rpc)
    if case == "int64-hidden":
        tensors[0] = torch.ones(1, 3, H, dtype=torch.int64)
        needle = f"{name} must be a floating point tensor, got int64"
    elif case == "bool-hidden":
        tensors[0] = torch.ones(1, 3, H, dtype=torch.bool)
        needle = f"{name} must be a floating point tensor, got bool"
    elif case == "unknown-dtype":
        tensors[0] = _raw("float8_e4m3fn", (1, 3, H), bytes(3 * H))
        needle = "tensor 0: unsupported dtype 'float8_e4m3fn'"
    elif case == "no-dtype":
        tensors[0] = _raw("", (1, 3, H), bytes(4 * 3 * H))
        # in a *_stream request a part without a dtype continues the previous tensor (PROTOCOL 3.2)
        needle = (
            "stream part without a dtype before any tensor header" if rpc.endswith("_stream") else "tensor has no dtype"
        )
    elif case == "short-buffer":
        tensors[0] = _raw("float32", (1, 3, H), bytes(3))
        needle = "buffer has 3 bytes, expected 768 for float32[1, 3, 64]"
    elif case == "absurd-dim":  # Tensor.size is uint32 on the wire: no negative dimension can be sent
        tensors[0] = _raw("float32", (1, 2**32 - 1, H), b"")
        needle = f"absurd dimension {2**32 - 1}"
    elif case == "bad-compression":
        tensors[0] = runtime_pb2.Tensor(dtype="float32", size=[1, 3, H], buffer=bytes(4 * 3 * H), compression=42)
        needle = "unknown compression type 42"
    elif case == "float-hypo-ids":
        tensors[2] = torch.tensor([0.0])
        needle = "hypo_ids must be int64, got float32"
    elif case == "int-prompts":
        tensors[-2 if kind(rpc) == "inference" else -1] = torch.ones(4, 1, 1, H, dtype=torch.int64)
        needle = "prompts must be a floating point tensor"
    caller.expect_error(rpc, request(rpc, tensors=tensors), needle)


NAN_CASES = {
    "nan-hidden": TENSOR_RPCS,
    "inf-hidden": TENSOR_RPCS,
    "nan-prompts": TENSOR_RPCS,
    "nan-grad-outputs": BACKWARD,
    "nan-later-step": INFERENCE,
}


@pytest.mark.parametrize("rpc, case", combos(NAN_CASES))
def test_nan(caller, rpc, case):
    name = _first_name(rpc)
    tensors = default_tensors(rpc)
    if case in ("nan-hidden", "inf-hidden"):
        tensors[0] = tensors[0].clone()
        tensors[0][0, 1, 7] = math.nan if case == "nan-hidden" else -math.inf
        if kind(rpc) == "backward":
            tensors[1] = torch.ones_like(tensors[0])
        needle = f"{name} contain NaN or infinite values"
    elif case == "nan-grad-outputs":
        tensors[1] = torch.full((1, 3, H), math.nan)
        needle = "grad_outputs contain NaN or infinite values"
    elif case == "nan-prompts":
        tensors[-2 if kind(rpc) == "inference" else -1] = torch.full((4, 1, 1, H), math.nan)
        needle = "prompts contain NaN or infinite values"
    else:
        first = request(rpc)
        bad = hidden(1, 1).clone()
        bad[0, 0, 0] = math.nan
        steps = [first, next_step(first, [bad, EMPTY, NO_HYPO], start_from_position=3)]
        caller.expect_error(rpc, steps, "hidden_states contain NaN", responses_before=1)
        return
    caller.expect_error(rpc, request(rpc, tensors=tensors), needle)


@pytest.mark.parametrize("shape", [(1, MAX_TOKENS + 1), (2, MAX_TOKENS // 2 + 1)], ids=["long", "wide"])
@pytest.mark.parametrize("rpc", TENSOR_RPCS)
def test_batch_over_max_batch_size(caller, rpc, shape):
    """B*T tokens over --max_batch_size (8192 for GQA micro-llama) is refused before any compute.

    float16 keeps even a backward (inputs + grad_outputs) under hivemind's 4 MiB unary limit.
    An inference session is opened with batch B and a max_length that fits the cache; its first
    step then carries T tokens, so the step is refused, not the allocation.
    """
    b, t = shape
    h = torch.zeros(b, t, H, dtype=torch.float16)
    tensors = default_tensors(rpc, h)
    metadata = {"max_length": MAX_TOKENS} if rpc == "rpc_inference" else {}
    caller.expect_error(rpc, request(rpc, tensors=tensors, **metadata), f"max_batch_size ({b * t} > {MAX_TOKENS})")


@pytest.mark.parametrize("shape", [(1, 0), (0, 3)], ids=["no-positions", "no-sequences"])
@pytest.mark.parametrize("rpc", ["rpc_forward", "rpc_backward"])
def test_no_tokens_are_answered_with_nothing(caller, rpc, shape):
    """A forward of [1, 0, H] took the runtime down (it divided by the token count): blocks map no tokens to
    none, and the answer is an empty tensor of the same shape (the autouse check: no actor restarted)."""
    h = torch.zeros(*shape, H)
    (response,) = caller.call(rpc, request(rpc, tensors=default_tensors(rpc, h)))
    assert wire.decode_tensor(response.tensors[0]).shape == (*shape, H)


# --- 4. inference: max_length and steps ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [5.0, "5", b"5", [5], True, None, "missing"],
    ids=["float", "str", "bytes", "list", "bool", "nil", "missing"],
)
def test_max_length_not_int(caller, value):
    """A float is refused like Petals does; unlike Petals (PROTOCOL 7.3.9) so is a bool. nil = missing."""
    if value is None or value == "missing":
        first = (
            request("rpc_inference", max_length=None)
            if value is None
            else request("rpc_inference", drop=["max_length"])
        )
        caller.expect_error("rpc_inference", first, "the first inference message must set max_length")
        return
    caller.expect_error(
        "rpc_inference",
        request("rpc_inference", max_length=value),
        f"max_length must be an int, got {type(value).__name__}",
    )


@pytest.mark.parametrize("value", [-1, -(2**63)])
def test_max_length_negative(caller, value):
    caller.expect_error(
        "rpc_inference", request("rpc_inference", max_length=value), f"Cannot allocate KV cache for {value} tokens"
    )


@pytest.mark.parametrize("value", [MAX_TOKENS + 1, 2**64 - 1])
def test_max_length_over_inference_max_length(caller, value):
    caller.expect_error(
        "rpc_inference",
        request("rpc_inference", max_length=value),
        f"Cannot allocate KV cache for {value} tokens, max = {MAX_TOKENS}",
    )


@pytest.mark.parametrize(
    "case", ["first-step", "later-step", "start-from-position-past-prefix", "negative-start-from-position"]
)
def test_step_past_max_length(caller, case):
    rpc = "rpc_inference"
    if case == "first-step":
        caller.expect_error(
            rpc, request(rpc, max_length=2), "Maximum length exceeded: prefix 0 + current 3 > max_length 2"
        )
        return
    first = request(rpc, max_length=4)
    if case == "later-step":
        second = next_step(first, [hidden(1, 2), EMPTY, NO_HYPO], start_from_position=3)
        caller.expect_error(
            rpc, [first, second], "Maximum length exceeded: prefix 3 + current 2 > max_length 4", responses_before=1
        )
    elif case == "start-from-position-past-prefix":
        second = next_step(first, [hidden(1, 1), EMPTY, NO_HYPO], start_from_position=4)
        caller.expect_error(rpc, [first, second], "start_from_position 4 is outside the 3 tokens", responses_before=1)
    else:
        second = next_step(first, [hidden(1, 1), EMPTY, NO_HYPO], start_from_position=-1)
        caller.expect_error(rpc, [first, second], "start_from_position -1", responses_before=1)


NEXT_SERVERS_CASES = {
    "past-the-model": ([("QmPeer", "s", 0, 2**62)], "next_servers entry spans blocks 0:4611686018427387904, outside"),
    "empty-span": ([("QmPeer", "s", 2, 2)], "next_servers entry spans blocks 2:2, outside"),
    "negative": ([("QmPeer", "s", -1, 2)], "next_servers entry spans blocks -1:2, outside"),
    "more-entries-than-blocks": ([("QmPeer", "s", 0, 1)] * 5, "next_servers has 5 entries for a model of 4 blocks"),
    "long-peer-id": ([("Q" * 1000, "s", 0, 1)], "next_servers entry has an id longer than 128 characters"),
    "not-a-list": ("QmPeer", "next_servers must be a list"),
}


@pytest.mark.parametrize("case", NEXT_SERVERS_CASES)
def test_next_servers_out_of_range(caller, case):
    """Checked before the step runs: a span past the model once made a frontend build a uid string over
    2**62 blocks on its event loop (gigabytes, the frontend replaced)."""
    value, needle = NEXT_SERVERS_CASES[case]
    caller.expect_error("rpc_inference", request("rpc_inference", next_servers=value), needle)


def test_push_only_to_peers_the_swarm_shows_serving(caller, micro_node):
    """Anyone can name any peer in next_servers: the node answers the step and pushes only to a peer its
    view of the swarm shows serving those blocks (this one serves nothing), forwarding no metadata of its
    own making; the refusal is counted and logged with the client's peer."""
    stranger = "QmS9KwZptnVdB9FFV7uGgaTq4sEKBwcYeKZDfSpyKDUd1g"
    responses = caller.call("rpc_inference", request("rpc_inference", next_servers=[(stranger, "sid", 0, 4)]))
    assert len(responses) == 1 and len(responses[0].tensors) == 1
    wait_until(
        lambda: any(e.get("event") == "refused" and e.get("reason") == "push_target" for e in micro_node.log_events()),
        timeout=30,
        what="the push to a stranger refused",
    )


@pytest.mark.parametrize("key", ["session_id", "step_id"])
def test_ids_of_bounded_length(caller, key):
    caller.expect_error(
        "rpc_inference", request("rpc_inference", **{key: "x" * 1000}), f"{key} is 1000 characters long"
    )


def test_sessions_of_nothing_are_refused(caller):
    """No session of zero tokens or zero rows: it would hold a slot while reserving no cache."""
    caller.expect_error("rpc_inference", request("rpc_inference", max_length=0), "max_length must be at least 1")
    empty_batch = [torch.randn(0, 3, H), EMPTY, NO_HYPO]
    caller.expect_error("rpc_inference", request("rpc_inference", tensors=empty_batch), "batch size must be from 1")


@pytest.mark.parametrize("rpc", TENSOR_RPCS)
def test_float64_and_too_many_tensors_are_refused_before_decoding(caller, rpc):
    tensors = default_tensors(rpc, hidden(dtype=torch.float64))
    caller.expect_error(rpc, request(rpc, tensors=tensors), "must be float32, float16, bfloat16, got float64")
    caller.expect_error(rpc, request(rpc, tensors=[hidden()] * 9, drop=["args_structure"]), "at most 8 tensors, got 9")


# --- 5. args_structure --------------------------------------------------------------------------------

BAD_ARGS_STRUCTURES = {
    "not-a-pair": ((b"__T0", b"__T1", b"__T2"),),
    "string": "((__T0, __T1), {})",
    "args-not-tuple": (5, {}),
    "kwargs-not-map": ((b"__T0", b"__T1", b"__T2"), [1]),
    "leaf-not-reference": ((b"__X0", b"__T1", b"__T2"), {}),
    "index-out-of-range": ((b"__T0", b"__T9", b"__T2"), {}),
    "tuple-for-a-tensor": (((b"__T0",), b"__T1", b"__T2"), {}),
    "too-deep": (((((((((((b"__T0",),),),),),),),),), b"__T1", b"__T2"), {}),
    "int-leaf": ((0, 1, 2), {}),
}


@pytest.mark.parametrize("case", BAD_ARGS_STRUCTURES)
@pytest.mark.parametrize("rpc", TENSOR_RPCS)
def test_bad_args_structure(caller, rpc, case):
    structure = BAD_ARGS_STRUCTURES[case]
    if kind(rpc) == "forward" and isinstance(structure, tuple) and structure and isinstance(structure[0], tuple):
        structure = (structure[0][:2],) + structure[1:]
    caller.expect_error(rpc, request(rpc, args_structure=structure), "args_structure")


# --- 6. rpc_push --------------------------------------------------------------------------------------


def test_push_unknown_session(caller):
    """rpc_push for a session this node does not have: ignored, with an empty reply (like Petals).

    PROTOCOL 3.7: the receiver checks the uids and requires metadata.session_id; if that session is not
    open here it ignores the request and always replies with an empty ExpertResponse. A push is only a
    latency optimization racing the client's own copy of the step, so a late push (the session already
    closed) or one for a session on another server must not be an error, and the pushed tensors are not
    even looked at. So: an unknown (or already closed) session -> empty reply, nothing breaks; no
    session_id, a session_id that is not a string, undecodable metadata, or a uid this node does not
    serve -> a clear error to the pusher.
    """
    rpc = "rpc_push"
    assert caller.call(rpc, request(rpc, session_id=str(uuid.uuid4()))) == [runtime_pb2.ExpertResponse()]
    # pushed tensors for an unknown session are not decoded: even garbage is simply dropped
    junk = [_raw("float8_e4m3fn", (1, 3), b"x")]
    assert caller.call(rpc, request(rpc, tensors=junk, session_id="no-such-session")) == [runtime_pb2.ExpertResponse()]

    # a session that existed but is closed now: same as unknown
    first = request("rpc_inference")
    assert len(caller.call("rpc_inference", [first, runtime_pb2.ExpertRequest()])) == 1
    closed = wire.unpack_metadata(first.metadata)["session_id"]
    assert caller.call(rpc, request(rpc, session_id=closed)) == [runtime_pb2.ExpertResponse()]

    caller.expect_error(rpc, request(rpc, drop=["session_id"]), "rpc_push needs metadata.session_id")
    caller.expect_error(rpc, request(rpc, session_id=""), "rpc_push needs metadata.session_id")
    caller.expect_error(rpc, request(rpc, session_id=1234), "rpc_push needs metadata.session_id")
    caller.expect_error(rpc, request(rpc, uid="micro-llama.7"), "does not serve micro-llama.7")
    bad_meta = runtime_pb2.ExpertRequest(uid=UID, tensors=[enc(hidden())], metadata=b"\xc1garbage")
    caller.expect_error(rpc, bad_meta, "metadata is not valid msgpack")
    not_map = runtime_pb2.ExpertRequest(uid=UID, tensors=[enc(hidden())], metadata=wire.pack_metadata([1, 2]))
    caller.expect_error(rpc, not_map, "metadata must be a msgpack map")


# --- 7. other sessions are not disturbed -------------------------------------------------------------

SESSION_TOKENS = 12
SESSION_INPUT = hidden(1, SESSION_TOKENS, seed=77)


async def _healthy_session(
    swarm, started: Optional[asyncio.Event] = None, sessions: Optional[list] = None
) -> torch.Tensor:
    """Prefill 4 tokens, then one token per step; returns every output, concatenated."""
    outputs = []
    async with swarm.inference_session(max_length=SESSION_TOKENS, start=0, end=4) as session:
        if sessions is not None:
            sessions.extend(session.sessions)
        outputs.append(await session.step(SESSION_INPUT[:, :4]))
        if started is not None:
            started.set()
        for t in range(4, SESSION_TOKENS):
            outputs.append(await session.step(SESSION_INPUT[:, t : t + 1]))
            await asyncio.sleep(0.02)  # leave room for the barrage between steps
    return torch.cat(outputs, dim=1)


def _barrage_requests(session_id: str) -> list[tuple[str, Any]]:
    """One of (nearly) every kind of bad request, plus bad pushes aimed at the healthy session itself."""
    nan = hidden().clone()
    nan[0, 0, 0] = math.nan
    bad = []
    for rpc in TENSOR_RPCS:
        bad += [
            (rpc, request(rpc, uid="micro-llama.9")),
            (rpc, request(rpc, tensors=default_tensors(rpc, nan))),
            (rpc, request(rpc, tensors=default_tensors(rpc, torch.randn(1, 3, 5)))),
            (rpc, request(rpc, args_structure=(5, {}))),
            (rpc, request(rpc, tensors=default_tensors(rpc, torch.zeros(1, MAX_TOKENS + 1, H, dtype=torch.float16)))),
            (rpc, request(rpc, tensors=default_tensors(rpc)[:1], drop=["args_structure"])),
        ]
    bad += [
        ("rpc_inference", request("rpc_inference", max_length=-1)),
        ("rpc_inference", request("rpc_inference", max_length=5.0)),
        ("rpc_inference", request("rpc_inference", max_length=MAX_TOKENS + 1)),
        ("rpc_info", runtime_pb2.ExpertUID(uid="micro-llama.4")),
        ("rpc_push", request("rpc_push", drop=["session_id"])),
        ("rpc_push", request("rpc_push", session_id=str(uuid.uuid4()))),
        # pushes into the healthy session (as if from a broken upstream server): they must be dropped,
        # not end the session; the client's own copy of each step is what counts
        ("rpc_push", request("rpc_push", tensors=[nan, EMPTY, NO_HYPO], session_id=session_id, drop=["max_length"])),
        (
            "rpc_push",
            request(
                "rpc_push", tensors=[torch.randn(3, 3, H), EMPTY, NO_HYPO], session_id=session_id, drop=["max_length"]
            ),
        ),
        (
            "rpc_push",
            request("rpc_push", tensors=[hidden()], session_id=session_id, drop=["max_length"], args_structure=(1, 2)),
        ),
        (
            "rpc_push",
            request("rpc_push", tensors=[hidden(1, 100), EMPTY, NO_HYPO], session_id=session_id, drop=["max_length"]),
        ),
        ("rpc_push", request("rpc_push", tensors=[], session_id=session_id, drop=["max_length"])),  # not a close
    ]
    return bad


def _wave(caller: Caller, session_id: str) -> list[tuple[str, str, Any]]:
    """(how, rpc, coroutine) for every bad request of one wave."""
    calls = [("request", rpc, caller.acall_collect(rpc, msg)) for rpc, msg in _barrage_requests(session_id)]
    calls += [("garbage", rpc, caller.araw_unary(rpc, GARBAGE)) for rpc in UNARY]
    calls += [("frame", rpc, caller.araw_stream(rpc, framing.MESSAGE + (2**40).to_bytes(8, "big"))) for rpc in STREAMS]
    return calls


def _check_refused(how: str, rpc: str, result: Any) -> None:
    if how == "garbage":
        assert isinstance(result, P2PHandlerError) and "DecodeError" in str(result), f"{rpc}: {result!r}"
        return
    assert not isinstance(result, BaseException), f"{rpc}: {result!r}"
    if how == "frame":
        assert len(result) == 1 and result[0][0] == framing.ERROR, f"{rpc}: {result!r}"
        assert "exceeds the limit" in framing.error_text(result[0][1])
        return
    responses, error = result
    if rpc == "rpc_push" and error is None:  # a push with a session_id is accepted: empty reply, dropped later
        assert responses == [runtime_pb2.ExpertResponse()]
    else:
        assert error is not None and not responses, f"{rpc} accepted a bad request: {responses}"


def test_other_sessions_not_disturbed(caller, micro_client):
    """A healthy inference session, stepped while two waves of bad requests hit the node (bad pushes aimed
    at that very session included), gives exactly the outputs of the same session run undisturbed, and
    each bad request still gets its error."""
    swarm = micro_client.swarm
    undisturbed = caller.run(_healthy_session(swarm))

    async def disturbed() -> tuple[torch.Tensor, list]:
        started, sessions = asyncio.Event(), []
        healthy = asyncio.ensure_future(_healthy_session(swarm, started, sessions))
        await asyncio.wait_for(started.wait(), TIMEOUT)
        checked = []
        for _ in range(2):  # two waves, so that bad requests land between several steps
            calls = _wave(caller, sessions[0].session_id)
            results = await asyncio.gather(*(coro for _, _, coro in calls), return_exceptions=True)
            checked += [(how, rpc, result) for (how, rpc, _), result in zip(calls, results)]
        return await asyncio.wait_for(healthy, TIMEOUT), checked

    outputs, checked = caller.run(disturbed(), timeout=2 * TIMEOUT + 10)
    assert torch.equal(outputs, undisturbed)
    for how, rpc, result in checked:
        _check_refused(how, rpc, result)


def test_a_session_id_already_open_is_refused(caller, micro_client):
    """A second stream naming an open session's id is refused; the first session goes on."""
    session = micro_client.session(16, 0, 4)
    with session:
        session.step(torch.randn(1, 2, H))
        open_id = session.session.sessions[0].session_id
        twin = request("rpc_inference", session_id=open_id)
        caller.expect_error("rpc_inference", twin, "already open on this server")
        session.step(torch.randn(1, 1, H))
