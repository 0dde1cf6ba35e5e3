"""Conformance: replay every recorded llama scenario of shared/vectors against the node serving micro-llama.

For each call of a scenario (shared/vectors/llama/<scenario>/c<k>_<handler>/), the recorded
`NNN_request.pb` messages are sent byte for byte (recorded session_id / step_id included) to the
same handler, `TransformerConnectionHandler.<rpc>`, following the recorded interleaving of
meta.json `calls[].sequence`: rpc_inference sends req0, waits for resp0, sends req1, ...; the
*_stream handlers get every part and END_OF_STREAM before anything is read. What comes back is
compared with the recorded `NNN_response.pb`:

* the same number of messages and of tensors per message, no metadata;
* each tensor: the same size, dtype, compression, chunks and requires_grad;
* values: max|ours - recorded| <= TOL * max|recorded| (TOL = 1e-5, relative to the max magnitude);
* error scenarios: an error (P2PHandlerError) whose text says what was wrong (a per-scenario
  pattern, not Petals' exact text).

rpc_info is compared as decoded maps: same keys and descriptors, `version` excepted, and
cache_tokens_available equal to the recorded 65536.

Calls of one scenario run one after the other, except 04 whose two forwards were concurrent in the
recording and are replayed concurrently.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import VECTORS

LLAMA = VECTORS / "llama"
PREFIX = "TransformerConnectionHandler."
TOL = 1e-5
TIMEOUT = 30.0
CONCURRENT = {"04_forward_split_batch"}  # recorded as concurrent unary calls

# What an error must say (case-insensitive regex, searched in the error text).
ERROR_PATTERNS = {
    "11_error_unknown_uid_rpc_info": r"(does not serve|not served|unknown|KeyError).*micro-llama\.99",
    "12_error_unknown_uid_forward": r"does not serve.*micro-llama\.99",
    "13_error_unknown_uid_inference": r"does not serve.*micro-llama\.99",
    "14_error_max_length_too_large": r"(Cannot allocate|max_length).*9000|9000.*(max_length|8192)",
    "15_error_step_beyond_max_length": r"Maximum length.*6",
    "16_error_hypo_ids_dtype": r"hypo[_ ]ids.*(int64|int32)",
}


def _scenarios() -> list[dict]:
    return json.loads((VECTORS / "index.json").read_text())["llama"]


SCENARIOS = _scenarios()
ERRORS: dict[str, list] = {}  # scenario -> [(where, max abs diff, rel diff)], printed for the record


def _proto(name: str):
    from hivemind.proto import runtime_pb2

    return getattr(runtime_pb2, name)


def _read(path: Path, kind: str):
    msg = _proto(kind)()
    msg.ParseFromString(path.read_bytes())
    return msg


def _types(handler: str) -> tuple[str, str]:
    return ("ExpertUID", "ExpertInfo") if handler == "rpc_info" else ("ExpertRequest", "ExpertResponse")


_EVENT = re.compile(r"^(request|response) (\d{3})_(request|response)\.pb\b")


def _events(call: dict) -> list[tuple[str, object]]:
    """meta.json sequence -> [("send", n) | ("recv", n) | ("end", None) | ("error", None)]."""
    out = []
    for entry in call["sequence"]:
        m = _EVENT.match(entry)
        if m:
            out.append(("send" if m.group(1) == "request" else "recv", int(m.group(2))))
        elif entry.startswith("request stream ended by client"):
            out.append(("end", None))
        elif entry.startswith("handler raised"):
            out.append(("error", None))
        elif entry.startswith("error sent"):
            pass
        else:
            raise AssertionError(f"unknown sequence entry {entry!r}")
    return out


def _array(t) -> np.ndarray:
    from protocol import wire

    raw = wire.decode_tensor(t)
    return wire.to_torch(raw).detach().cpu().numpy()


def _compare_response(scenario: str, where: str, got, want) -> None:
    assert got.metadata == want.metadata, f"{where}: metadata {got.metadata!r} != recorded {want.metadata!r}"
    assert len(got.tensors) == len(want.tensors), f"{where}: {len(got.tensors)} tensors, recorded {len(want.tensors)}"
    for i, (g, w) in enumerate(zip(got.tensors, want.tensors)):
        at = f"{where} tensors[{i}]"
        assert list(g.size) == list(w.size), f"{at}: size {list(g.size)} != recorded {list(w.size)}"
        assert g.dtype == w.dtype, f"{at}: dtype {g.dtype} != recorded {w.dtype}"
        assert g.compression == w.compression, f"{at}: compression {g.compression} != recorded {w.compression}"
        assert g.chunks == w.chunks, f"{at}: chunks {g.chunks} != recorded {w.chunks}"
        assert g.requires_grad == w.requires_grad, f"{at}: requires_grad {g.requires_grad} != recorded {w.requires_grad}"
        a, b = _array(g).astype(np.float64), _array(w).astype(np.float64)
        assert a.shape == b.shape
        if b.size == 0:
            continue
        assert np.isfinite(a).all(), f"{at}: non-finite values"
        diff = float(np.abs(a - b).max())
        scale = max(float(np.abs(b).max()), 1e-12)
        ERRORS.setdefault(scenario, []).append((at, diff, diff / scale))
        assert diff <= TOL * scale, f"{at}: max|diff| {diff:.3g} > {TOL} * max|recorded| {scale:.3g} (rel {diff / scale:.3g})"


def _compare_rpc_info(got_bytes: bytes, want_bytes: bytes) -> None:
    from protocol.rpc_info import decode_rpc_info

    got, want = decode_rpc_info(got_bytes), decode_rpc_info(want_bytes)
    assert set(got) == set(want), f"rpc_info keys {sorted(got)} != recorded {sorted(want)}"
    assert isinstance(got["version"], str) and got["version"]
    assert got["cache_tokens_available"] == want["cache_tokens_available"] == 65536
    for key in sorted(set(want) - {"version"}):
        assert _plain(got[key]) == _plain(want[key]), f"rpc_info[{key!r}]: {got[key]!r} != recorded {want[key]!r}"


def _plain(value):
    """Descriptors and containers as comparable plain values (tuple vs list kept apart)."""
    from hivemind.utils.tensor_descr import TensorDescriptor

    if isinstance(value, TensorDescriptor):
        return ("descriptor", type(value).__name__, tuple(value.size), str(value.dtype), str(value.layout),
                value.requires_grad, value.pin_memory, value.compression, str(value.device))
    if isinstance(value, tuple):
        return ("tuple", tuple(_plain(v) for v in value))
    if isinstance(value, list):
        return ("list", tuple(_plain(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _plain(v)) for k, v in value.items())))
    return (type(value).__name__, value)


async def _replay_unary(p2p, peer, scenario: str, call: dict, folder: Path, status: str) -> None:
    from hivemind.p2p import P2PHandlerError

    handler = call["handler"]
    req_type, resp_type = _types(handler)
    request = _read(folder / "000_request.pb", req_type)
    coro = p2p.call_protobuf_handler(peer, PREFIX + handler, request, _proto(resp_type))
    if status == "error":
        with pytest.raises(P2PHandlerError) as info:
            await asyncio.wait_for(coro, TIMEOUT)
        _check_error(scenario, folder.name, str(info.value))
        return
    response = await asyncio.wait_for(coro, TIMEOUT)
    want = _read(folder / "000_response.pb", resp_type)
    if handler == "rpc_info":
        _compare_rpc_info(response.serialized_info, want.serialized_info)
    else:
        _compare_response(scenario, f"{folder.name}/000_response.pb", response, want)


async def _replay_stream(p2p, peer, scenario: str, call: dict, folder: Path, status: str) -> None:
    from hivemind.p2p import P2PHandlerError

    handler = call["handler"]
    ExpertResponse = _proto("ExpertResponse")
    queue: asyncio.Queue = asyncio.Queue()

    async def requests():
        while True:
            item = await queue.get()
            if item is None:  # END_OF_STREAM
                return
            yield item

    responses = await p2p.iterate_protobuf_handler(peer, PREFIX + handler, requests(), ExpertResponse)
    ended = False
    try:
        for kind, n in _events(call):
            if kind == "send":
                queue.put_nowait(_read(folder / f"{n:03d}_request.pb", "ExpertRequest"))
            elif kind == "end":
                queue.put_nowait(None)
                ended = True
            elif kind == "recv":
                where = f"{folder.name}/{n:03d}_response.pb"
                try:
                    got = await asyncio.wait_for(responses.__anext__(), TIMEOUT)
                except StopAsyncIteration:
                    raise AssertionError(f"{where}: the node ended the stream instead of answering") from None
                _compare_response(scenario, where, got, _read(folder / f"{n:03d}_response.pb", "ExpertResponse"))
            elif kind == "error":
                with pytest.raises(P2PHandlerError) as info:
                    got = await asyncio.wait_for(responses.__anext__(), TIMEOUT)
                    pytest.fail(f"{folder.name}: expected an error, got a response with {len(got.tensors)} tensors")
                _check_error(scenario, folder.name, str(info.value))
                return
        assert status == "ok", f"{folder.name}: recorded status {status} but no error in the sequence"
        if not ended:  # after the close message, the client ends its side of the stream
            queue.put_nowait(None)
        extra = []
        async def drain():
            async for response in responses:
                extra.append(response)
        await asyncio.wait_for(drain(), TIMEOUT)
        assert not extra, f"{folder.name}: {len(extra)} unexpected extra response(s) after the recorded ones"
    finally:
        queue.put_nowait(None)
        await responses.aclose()


def _check_error(scenario: str, where: str, text: str) -> None:
    pattern = ERROR_PATTERNS[scenario]
    print(f"{scenario} {where}: error {text!r}")
    assert re.search(pattern, text, re.IGNORECASE | re.DOTALL), f"{where}: error {text!r} does not match {pattern!r}"


async def _replay_call(p2p, peer, scenario: str, call: dict, status: str) -> None:
    folder = LLAMA / scenario / call["folder"]
    if call["kind"].startswith("unary"):
        await _replay_unary(p2p, peer, scenario, call, folder, status)
    else:
        await _replay_stream(p2p, peer, scenario, call, folder, status)


@pytest.mark.parametrize("entry", SCENARIOS, ids=[s["scenario"] for s in SCENARIOS])
def test_replay_llama_vectors(entry, micro_node, micro_client):
    from hivemind.p2p import PeerID

    scenario = entry["scenario"]
    meta = json.loads((LLAMA / scenario / "meta.json").read_text())
    calls = {c["folder"]: c for c in meta["calls"]}
    plan = []
    for folder, status, n_requests, n_responses in entry["calls"]:
        call = calls[folder]
        assert call["status"] == status
        assert len(list((LLAMA / scenario / folder).glob("*_request.pb"))) == n_requests
        assert len(list((LLAMA / scenario / folder).glob("*_response.pb"))) == n_responses
        plan.append((call, status))
    if scenario in ERROR_PATTERNS:
        assert any(status == "error" for _, status in plan)

    p2p = micro_client.swarm.p2p
    peer = PeerID.from_base58(micro_node.peer_id)

    async def run():
        if scenario in CONCURRENT:
            await asyncio.gather(*(_replay_call(p2p, peer, scenario, call, status) for call, status in plan))
        else:
            for call, status in plan:
                await _replay_call(p2p, peer, scenario, call, status)

    micro_client.run(run(), timeout=4 * TIMEOUT)
    for where, diff, rel in ERRORS.get(scenario, []):
        print(f"{scenario} {where}: max|diff| {diff:.3g}, rel {rel:.3g}")
