"""Conformance: replay every recorded scenario of shared/vectors against a node serving the micro model of
its family (llama, bloom, falcon, mixtral), and generate through each with the project's client.

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
cache_tokens_available equal to the recorded value (llama: 65536).

Calls of one scenario run one after the other, except 04 whose two forwards were concurrent in the
recording and are replayed concurrently.

Falcon: Petals could not serve it (every recorded forward and inference call is Petals' own error), so the
node must answer those requests instead, with the transformers outputs of the scenario's
tensors.safetensors, in the response format Petals uses for the other families. The inference scenario's
later steps never reached the Petals server; they are sent here, built from the same tensors.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.paths import SHARED, VECTORS

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
        assert g.requires_grad == w.requires_grad, (
            f"{at}: requires_grad {g.requires_grad} != recorded {w.requires_grad}"
        )
        a, b = _array(g).astype(np.float64), _array(w).astype(np.float64)
        assert a.shape == b.shape
        if b.size == 0:
            continue
        assert np.isfinite(a).all(), f"{at}: non-finite values"
        diff = float(np.abs(a - b).max())
        scale = max(float(np.abs(b).max()), 1e-12)
        ERRORS.setdefault(scenario, []).append((at, diff, diff / scale))
        assert diff <= TOL * scale, (
            f"{at}: max|diff| {diff:.3g} > {TOL} * max|recorded| {scale:.3g} (rel {diff / scale:.3g})"
        )


def _compare_rpc_info(got_bytes: bytes, want_bytes: bytes) -> None:
    from protocol.rpc_info import decode_rpc_info

    got, want = decode_rpc_info(got_bytes), decode_rpc_info(want_bytes)
    assert set(got) == set(want), f"rpc_info keys {sorted(got)} != recorded {sorted(want)}"
    assert isinstance(got["version"], str) and got["version"]
    assert got["cache_tokens_available"] == want["cache_tokens_available"]
    for key in sorted(set(want) - {"version"}):
        assert _plain(got[key]) == _plain(want[key]), f"rpc_info[{key!r}]: {got[key]!r} != recorded {want[key]!r}"


def _plain(value):
    """Descriptors and containers as comparable plain values (tuple vs list kept apart)."""
    from hivemind.utils.tensor_descr import TensorDescriptor

    if isinstance(value, TensorDescriptor):
        return (
            "descriptor",
            type(value).__name__,
            tuple(value.size),
            str(value.dtype),
            str(value.layout),
            value.requires_grad,
            value.pin_memory,
            value.compression,
            str(value.device),
        )
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


async def _replay_call(p2p, peer, scenario: str, call: dict, status: str, family: str = "llama") -> None:
    folder = VECTORS / family / scenario / call["folder"]
    if call["kind"].startswith("unary"):
        await _replay_unary(p2p, peer, scenario, call, folder, status)
    else:
        await _replay_stream(p2p, peer, scenario, call, folder, status)


def _plan(family: str, entry: dict) -> list[tuple[dict, str]]:
    """The recorded calls of one index.json entry, checked against meta.json and the files."""
    scenario = entry["scenario"]
    meta = json.loads((VECTORS / family / scenario / "meta.json").read_text())
    calls = {c["folder"]: c for c in meta["calls"]}
    plan = []
    for folder, status, n_requests, n_responses in entry["calls"]:
        call = calls[folder]
        assert call["status"] == status
        assert len(list((VECTORS / family / scenario / folder).glob("*_request.pb"))) == n_requests
        assert len(list((VECTORS / family / scenario / folder).glob("*_response.pb"))) == n_responses
        plan.append((call, status))
    return plan


def _print_errors(label: str, scenario: str) -> None:
    for where, diff, rel in ERRORS.pop(scenario, []):
        print(f"{label} {where}: max|diff| {diff:.3g}, rel {rel:.3g}")


@pytest.mark.parametrize("entry", SCENARIOS, ids=[s["scenario"] for s in SCENARIOS])
def test_replay_llama_vectors(entry, micro_node, micro_client):
    from hivemind.p2p import PeerID

    scenario = entry["scenario"]
    plan = _plan("llama", entry)
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
    _print_errors(scenario, scenario)


# --- bloom, falcon, mixtral: one node per family, shared by its replays and its generation test ---------

FAMILIES = ["bloom", "falcon", "mixtral"]
FAMILY_SCENARIOS = ["01_rpc_info", "02_forward_full", "08_inference_greedy_3steps"]


@pytest.fixture(scope="module")
def family_node(request, tmp_path_factory):
    """(family, node, client): a node serving all 4 blocks of micro-<family> under dht prefix micro-<family>."""
    from node.client.swarm import Client
    from node.tools.launcher import NodeProcess

    family = request.param
    node = NodeProcess(
        SHARED / "models" / f"micro-{family}",
        tmp_path_factory.mktemp("nodes") / family,
        "--num_handlers",
        "2",
        dht_prefix=f"micro-{family}",
    )
    node.start()
    client = Client(node.maddrs, f"micro-{family}")
    try:
        yield family, node, client
    finally:
        client.close()
        node.stop()


def _family_entry(family: str, scenario: str) -> dict:
    entries = {e["scenario"]: e for e in json.loads((VECTORS / "index.json").read_text())[family]}
    assert sorted(entries) == FAMILY_SCENARIOS
    return entries[scenario]


def _reference(family: str, scenario: str) -> dict:
    import safetensors.torch

    return safetensors.torch.load_file(str(VECTORS / family / scenario / "tensors.safetensors"))


def _expected_response(*tensors) -> object:
    """The ExpertResponse Petals sends for these outputs (raw float32, no compression, no metadata)."""
    from node.client.swarm import _encode

    return _proto("ExpertResponse")(tensors=[_encode(t) for t in tensors])


async def _falcon_forward(p2p, peer, scenario: str, call: dict) -> None:
    """Petals answered with an AttributeError; the node answers with transformers' outputs."""
    folder = VECTORS / "falcon" / scenario / call["folder"]
    request = _read(folder / "000_request.pb", "ExpertRequest")
    response = await asyncio.wait_for(
        p2p.call_protobuf_handler(peer, PREFIX + call["handler"], request, _proto("ExpertResponse")), TIMEOUT
    )
    want = _expected_response(_reference("falcon", scenario)["ref_outputs"])
    _compare_response(scenario, f"{folder.name}/response", response, want)


async def _falcon_inference(p2p, peer, scenario: str, call: dict, steps: int) -> None:
    """The recorded prefill, then (never recorded: Petals failed on the prefill) the single-token steps of the
    same greedy generation, then the close message; each output against transformers'."""
    from node.client.swarm import ARGS_3, _empty, _encode
    from protocol import wire

    folder = VECTORS / "falcon" / scenario / call["folder"]
    ref = _reference("falcon", scenario)
    first = _read(folder / "000_request.pb", "ExpertRequest")
    session_id = wire.unpack_metadata(first.metadata)["session_id"]
    queue: asyncio.Queue = asyncio.Queue()

    async def requests():
        while (item := await queue.get()) is not None:
            yield item

    responses = await p2p.iterate_protobuf_handler(peer, PREFIX + "rpc_inference", requests(), _proto("ExpertResponse"))
    try:
        position = 0
        for step in range(steps):
            if step == 0:
                request = first
            else:
                metadata = {
                    "session_id": session_id,
                    "step_id": f"replay-step-{step}",
                    "start_from_position": position,
                    "args_structure": ARGS_3,
                }
                request = _proto("ExpertRequest")(
                    uid=first.uid,
                    tensors=[_encode(ref[f"step{step}_ref_inputs"]), _encode(_empty()), _encode(_empty(torch.int64))],
                    metadata=wire.pack_metadata(metadata),
                )
            queue.put_nowait(request)
            got = await asyncio.wait_for(responses.__anext__(), TIMEOUT)
            _compare_response(
                scenario, f"{folder.name} step {step}", got, _expected_response(ref[f"step{step}_ref_outputs"])
            )
            position += ref[f"step{step}_ref_inputs"].shape[1]
        queue.put_nowait(_proto("ExpertRequest")())  # the close message, then the end of the stream
        queue.put_nowait(None)
        extra = []

        async def drain():
            async for response in responses:
                extra.append(response)

        await asyncio.wait_for(drain(), TIMEOUT)
        assert not extra, f"{folder.name}: {len(extra)} unexpected response(s) after the close message"
    finally:
        queue.put_nowait(None)
        await responses.aclose()


@pytest.mark.parametrize("scenario", FAMILY_SCENARIOS)
@pytest.mark.parametrize("family_node", FAMILIES, indirect=True)
def test_replay_family_vectors(family_node, scenario):
    from hivemind.p2p import PeerID

    family, node, client = family_node
    plan = _plan(family, _family_entry(family, scenario))
    p2p = client.swarm.p2p
    peer = PeerID.from_base58(node.peer_id)

    async def run():
        for call, status in plan:
            if family == "falcon" and status == "error":
                assert call["handler"] in ("rpc_forward", "rpc_inference")
                if call["handler"] == "rpc_forward":
                    await _falcon_forward(p2p, peer, scenario, call)
                else:  # c0 as the whole generation; c1, Petals' client retrying, as just its prefill
                    await _falcon_inference(
                        p2p, peer, scenario, call, steps=3 if call["folder"].startswith("c0") else 1
                    )
            else:
                assert status == "ok"
                await _replay_call(p2p, peer, scenario, call, status, family)

    client.run(run(), timeout=4 * TIMEOUT)
    _print_errors(f"{family} {scenario}", scenario)


@pytest.mark.parametrize("family_node", FAMILIES, indirect=True)
def test_family_generation_matches_transformers(family_node):
    """Greedy generation through the node with the project's client (the embeddings, BLOOM's embedding norm,
    final norm and head on the client) equals transformers' generate on the whole model, and reproduces the
    recorded scenario's tokens (made with transformers 4.43)."""
    from transformers import AutoModelForCausalLM

    from node.client.generate import LocalHead, greedy_generate

    family, node, client = family_node
    path = str(SHARED / "models" / f"micro-{family}")
    head = LocalHead(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    recorded = _reference(family, "08_inference_greedy_3steps")
    prompt = recorded["prompt_ids"]
    assert torch.equal(greedy_generate(client, head, prompt, 3), recorded["ref_generated_ids"])
    prompt = torch.tensor([[7, 200, 31, 5, 64, 18]])
    ours = greedy_generate(client, head, prompt, 10)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()
