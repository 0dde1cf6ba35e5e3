"""protocol.dht_records against the values a Petals server stored (shared/vectors/dht), plus the client's
strict checks."""

from __future__ import annotations

import json
import math

import msgpack
import pytest
from hivemind.proto import dht_pb2
from hivemind.utils.serializer import MSGPackSerializer

from protocol import dht_records as d
from protocol.dht_records import ServerInfo, ServerState
from tests.helpers.paths import VECTORS

DHT = VECTORS / "dht"


def recorded_values():
    if not DHT.is_dir():
        return []
    return sorted(DHT.glob("*/*.msgpack"))


@pytest.mark.parametrize("path", recorded_values(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recorded_values_roundtrip(path):
    data = path.read_bytes()
    value = MSGPackSerializer.loads(data)
    family = path.parent.name
    listed = {v["file"]: v for v in json.loads((path.parent / "values.json").read_text())["values"]}[path.name]
    assert bytes.fromhex(listed["value_msgpack_hex"]) == data

    if path.name.startswith("models_record__"):
        assert listed["key"] == d.MODELS_KEY and listed["subkey"] == f"micro-{family}"
        num_blocks, repository = d.read_model_record(value)
        assert (num_blocks, repository) == (4, None)
        assert MSGPackSerializer.dumps(d.model_record(num_blocks, repository)) == data
        return

    key, state_name, _ = path.stem.split("__")
    assert listed["key"] == key and key in d.block_uids(f"micro-{family}", 0, 4)
    info = d.from_tuple(value)
    assert info.state == ServerState[state_name]
    assert (info.start_block, info.end_block, info.throughput) == (0, 4, 1.0)
    assert info.adapters == () and info.torch_dtype == "float32" and info.quant_type == "none"
    assert info.next_pings == (None if info.state == ServerState.OFFLINE else {})
    out = d.to_tuple(info)
    assert list(out[2]) == list(d.EXTRA_KEYS) == list(value[2])  # Petals' key order
    assert MSGPackSerializer.dumps(out) == data  # the very same bytes


def _dictionary_entries(value_bytes: bytes):
    """[(subkey, value bytes, expiration)] from a FOUND_DICTIONARY value (ext 0x50), read without
    hivemind's TimedStorage, which would drop entries whose recorded expiration has passed."""
    ext = msgpack.unpackb(value_bytes, ext_hook=lambda code, data: msgpack.ExtType(code, data), raw=False)
    assert ext.code == 0x50
    _maxsize, _latest, items = MSGPackSerializer.loads(ext.data)
    return items


@pytest.mark.parametrize("family", ["llama", "bloom", "mixtral", "falcon"])
def test_find_responses_and_spans(family):
    """The values the client read back via rpc_find decode, and give one ONLINE span over all 4 blocks."""
    from hivemind.dht.routing import DHTID

    prefix = f"micro-{family}"
    by_id = {DHTID.generate(source=key).to_bytes(): key for key in d.block_uids(prefix, 0, 4) + [d.MODELS_KEY]}
    infos: dict = {}
    models = []
    for path in sorted((DHT / family / "find").glob("*_request.pb")):
        request, response = dht_pb2.FindRequest(), dht_pb2.FindResponse()
        request.ParseFromString(path.read_bytes())
        response.ParseFromString(path.with_name(path.name.replace("request", "response")).read_bytes())
        for key_id, result in zip(request.keys, response.results):
            key = by_id[key_id]
            if result.type != dht_pb2.FOUND_DICTIONARY:
                continue
            for subkey, value_bytes, _expiration in _dictionary_entries(result.value):
                value = MSGPackSerializer.loads(value_bytes)
                if key == d.MODELS_KEY:
                    assert subkey == prefix
                    models.append(d.read_model_record(value))
                    continue
                info = d.from_tuple(value)
                assert MSGPackSerializer.dumps(d.to_tuple(info)) == value_bytes
                infos.setdefault(int(key.rsplit(".", 1)[1]), {})[subkey] = info
    assert sorted(infos) == [0, 1, 2, 3]
    assert models and all(m == (4, None) for m in models)
    spans = d.compute_spans(infos, ServerState.ONLINE)
    assert len(spans) == 1
    ((peer, span),) = spans.items()
    assert peer.startswith("Qm") and (span.start, span.end, span.state) == (0, 4, ServerState.ONLINE)


# --- from_tuple: what the client accepts and refuses ----------------------------------------------------


def good_extra(**changes):
    extra = {
        "start_block": 0,
        "end_block": 4,
        "public_name": None,
        "version": "2.3.0.dev2",
        "network_rps": None,
        "forward_rps": 1000.0,
        "inference_rps": None,
        "adapters": (),
        "torch_dtype": "float32",
        "quant_type": "none",
        "using_relay": False,
        "cache_tokens_left": 131072,
        "next_pings": {},
    }
    extra.update(changes)
    return extra


def test_from_tuple_accepts():
    assert d.from_tuple((2, 1.0)) == ServerInfo(ServerState.ONLINE, 1.0)  # no extra map
    assert d.from_tuple([1, 0.0, {}]) == ServerInfo(ServerState.JOINING, 0.0)  # a list is fine too
    info = d.from_tuple((2, 3.5, good_extra(future_field=[1, 2], next_pings={"QmX": math.inf, "QmY": 0.25}), "more"))
    assert info.next_pings == {"QmX": math.inf, "QmY": 0.25} and info.forward_rps == 1000.0
    assert not hasattr(info, "future_field")  # unknown keys ignored
    # pydantic v1's lax (non-strict) fields coerce like the client does
    lax = d.from_tuple((2, 1.0, good_extra(public_name=5, using_relay="yes", adapters=["a", b"b"], version=b"2.3")))
    assert (lax.public_name, lax.using_relay, lax.adapters, lax.version) == ("5", True, ("a", "b"), "2.3")
    assert d.from_tuple((2, 1.0, good_extra(using_relay=0))).using_relay is False
    # the state is looked up by value like ServerState(x): 2.0 and True match
    assert d.from_tuple((2.0, 1.0)).state is ServerState.ONLINE
    assert d.from_tuple((True, 1.0)).state is ServerState.JOINING


@pytest.mark.parametrize(
    "value, error, message",
    [
        ((2, 1), TypeError, r"^throughput must be a float, got int 1$"),
        ((2, True), TypeError, r"^throughput must be a float, got bool True$"),
        ((2, math.nan), ValueError, r"^throughput must be finite, got nan$"),
        ((2, math.inf), ValueError, r"^throughput must be finite, got inf$"),
        ((2, -1.0), ValueError, r"^throughput must be >= 0, got -1.0$"),
        ((2, "1.0"), TypeError, r"^throughput must be a float, got str '1.0'$"),
        ((3, 1.0), ValueError, r"^state must be one of 0 \(OFFLINE\), 1 \(JOINING\), 2 \(ONLINE\), got 3$"),
        (("2", 1.0), ValueError, r"^state must be one of .* got '2'$"),
        (([2], 1.0), ValueError, r"^state must be one of .* got \[2\]$"),
        ((2, 1.0, good_extra(start_block=0.0)), TypeError, r"^start_block must be an int, got float 0.0$"),
        ((2, 1.0, good_extra(end_block=True)), TypeError, r"^end_block must be an int, got bool True$"),
        ((2, 1.0, good_extra(end_block=-4)), ValueError, r"^end_block must be >= 0, got -4$"),
        ((2, 1.0, good_extra(cache_tokens_left=True)), TypeError, r"^cache_tokens_left must be an int, got bool True$"),
        ((2, 1.0, good_extra(cache_tokens_left=1.5)), TypeError, r"^cache_tokens_left must be an int, got float 1.5$"),
        ((2, 1.0, good_extra(forward_rps=10)), TypeError, r"^forward_rps must be a float, got int 10$"),
        ((2, 1.0, good_extra(inference_rps=math.inf)), ValueError, r"^inference_rps must be finite, got inf$"),
        ((2, 1.0, good_extra(network_rps=-0.5)), ValueError, r"^network_rps must be >= 0, got -0.5$"),
        ((2, 1.0, good_extra(next_pings={"QmX": 1})), TypeError, r"^next_pings\[QmX\] must be a float, got int 1$"),
        (
            (2, 1.0, good_extra(next_pings={"QmX": math.nan})),
            ValueError,
            r"^next_pings\[QmX\] must be finite, got nan$",
        ),
        ((2, 1.0, good_extra(next_pings={"QmX": -1.0})), ValueError, r"^next_pings\[QmX\] must be >= 0, got -1.0$"),
        (
            (2, 1.0, good_extra(next_pings=[1.0])),
            TypeError,
            r"^next_pings must be a map of peer id -> float, got list$",
        ),
        ((2, 1.0, good_extra(adapters="lora")), TypeError, r"^adapters must be a sequence of str, got str$"),
        ((2, 1.0, good_extra(adapters=None)), TypeError, r"^adapters must be a sequence of str, got None$"),
        ((2, 1.0, good_extra(adapters=(None,))), TypeError, r"^adapters\[0\] must be a str, got NoneType$"),
        ((2, 1.0, good_extra(public_name=["x"])), TypeError, r"^public_name must be a str, got list$"),
        ((2, 1.0, good_extra(version=b"\xff")), ValueError, r"^version is not valid UTF-8$"),
        ((2, 1.0, good_extra(using_relay="maybe")), TypeError, r"^using_relay must be a bool, got str 'maybe'$"),
        ((2, 1.0, good_extra(using_relay=[])), TypeError, r"^using_relay must be a bool, got list \[\]$"),
        ((2, 1.0, [1]), TypeError, r"^server info extra must be a map, got list$"),
        ((2, 1.0, {1: 2}), TypeError, r"^server info extra has a non-str key 1$"),
        ((2,), ValueError, r"^server info must have at least 2 elements \(state, throughput\), got 1$"),
        ({"state": 2}, TypeError, r"^server info must be a tuple \(state, throughput, extra\), got dict$"),
        (b"\x02\x00", TypeError, r"^server info must be a tuple .* got bytes$"),
    ],
)
def test_from_tuple_rejects(value, error, message):
    with pytest.raises(error, match=message):
        d.from_tuple(value)


# --- to_tuple: what we publish ---------------------------------------------------------------------------


def test_to_tuple_types():
    info = ServerInfo(
        state=ServerState.ONLINE,
        throughput=3,  # an int here would be refused by every client: it is published as 3.0
        start_block=2,
        end_block=6,
        forward_rps=100,
        adapters=["repo/lora"],
        using_relay=True,
        cache_tokens_left=0,
        next_pings={"QmPeer": 1, "QmGone": math.inf},
    )
    state, throughput, extra = d.to_tuple(info)
    assert type(state) is int and state == 2
    assert type(throughput) is float and throughput == 3.0
    assert type(extra["forward_rps"]) is float and extra["adapters"] == ("repo/lora",)
    assert extra["next_pings"] == {"QmPeer": 1.0, "QmGone": math.inf} and type(extra["next_pings"]["QmPeer"]) is float
    assert list(extra) == list(d.EXTRA_KEYS)
    packed = MSGPackSerializer.dumps(d.to_tuple(info))  # strict_types: any int/float/tuple subclass would fail here
    assert d.from_tuple(MSGPackSerializer.loads(packed)) == ServerInfo(
        state=ServerState.ONLINE,
        throughput=3.0,
        start_block=2,
        end_block=6,
        forward_rps=100.0,
        adapters=("repo/lora",),
        using_relay=True,
        cache_tokens_left=0,
        next_pings={"QmPeer": 1.0, "QmGone": math.inf},
    )
    assert d.to_tuple(ServerInfo(0, 0.0)) == (0, 0.0, {k: (() if k == "adapters" else None) for k in d.EXTRA_KEYS})


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"throughput": math.nan}, ValueError, r"^throughput must be finite, got nan$"),
        ({"throughput": True}, TypeError, r"^throughput must be a number, got bool True$"),
        ({"throughput": -1.0}, ValueError, r"^throughput must be >= 0"),
        ({"start_block": 1.0}, TypeError, r"^start_block must be an int, got float 1.0$"),
        ({"end_block": False}, TypeError, r"^end_block must be an int, got bool False$"),
        ({"cache_tokens_left": True}, TypeError, r"^cache_tokens_left must be an int, got bool True$"),
        ({"cache_tokens_left": -1}, ValueError, r"^cache_tokens_left must be >= 0, got -1$"),
        ({"inference_rps": math.inf}, ValueError, r"^inference_rps must be finite, got inf$"),
        ({"network_rps": "fast"}, TypeError, r"^network_rps must be a number, got str 'fast'$"),
        ({"next_pings": {"QmX": math.nan}}, ValueError, r"^next_pings\[QmX\] must be finite, got nan$"),
        ({"next_pings": [("QmX", 1.0)]}, TypeError, r"^next_pings must be a map"),
        ({"public_name": 5}, TypeError, r"^public_name must be a str, got int$"),
        ({"using_relay": 1}, TypeError, r"^using_relay must be a bool, got int$"),
        ({"adapters": "lora"}, TypeError, r"^adapters must be a sequence of str, got str$"),
        ({"state": 5}, ValueError, r"^state must be one of"),
    ],
)
def test_to_tuple_rejects(changes, error, message):
    fields = dict(state=ServerState.ONLINE, throughput=1.0)
    fields.update(changes)
    with pytest.raises(error, match=message):
        d.to_tuple(ServerInfo(**fields))


# --- model record, uids ------------------------------------------------------------------------------------


def test_model_record_and_uids():
    assert d.MODELS_KEY == "_petals.models"
    record = d.model_record(80, "https://huggingface.co/meta-llama/Llama-2-70b-hf")
    assert list(record) == ["num_blocks", "repository"]
    assert d.read_model_record(MSGPackSerializer.loads(MSGPackSerializer.dumps(record))) == (
        80,
        "https://huggingface.co/meta-llama/Llama-2-70b-hf",
    )
    assert d.read_model_record({"num_blocks": 3, "extra": 1}) == (3, None)
    with pytest.raises(ValueError, match=r"^num_blocks must be an int >= 1, got 0$"):
        d.model_record(0, None)
    with pytest.raises(ValueError, match=r"^num_blocks must be an int >= 1, got True$"):
        d.model_record(True, None)
    with pytest.raises(TypeError, match=r"^repository must be a str or None, got int$"):
        d.model_record(4, 5)
    with pytest.raises(TypeError, match=r"^num_blocks must be an int, got float 4.0$"):
        d.read_model_record({"num_blocks": 4.0})
    with pytest.raises(ValueError, match=r"^model record has no num_blocks$"):
        d.read_model_record({})
    with pytest.raises(TypeError, match=r"^model record must be a map, got tuple$"):
        d.read_model_record((4, None))
    assert d.block_uids("Llama-2-70b-chat-hf", 10, 12) == ["Llama-2-70b-chat-hf.10", "Llama-2-70b-chat-hf.11"]
    assert d.block_uids("p", 3, 3) == []


# --- spans ------------------------------------------------------------------------------------------------


def server(state=ServerState.ONLINE, start=None, end=None, throughput=1.0):
    return ServerInfo(state=state, throughput=throughput, start_block=start, end_block=end)


def test_compute_spans():
    a = server(start=0, end=8)
    b = server(start=4, end=6)
    c = server()  # no start/end published: span from where it is seen
    joining = server(ServerState.JOINING, start=2, end=5)
    infos = {
        2: {"QmA": a, "QmJ": joining},
        3: {"QmA": a, "QmC": c, "QmJ": joining},
        4: {"QmA": a, "QmB": b, "QmC": c, "QmJ": joining},
        5: {"QmA": a, "QmB": b},
    }
    spans = d.compute_spans(infos, ServerState.ONLINE)
    assert {p: (s.start, s.end) for p, s in spans.items()} == {"QmA": (2, 6), "QmB": (4, 6), "QmC": (3, 5)}
    assert spans["QmA"].info is a and spans["QmA"].length == 4 and spans["QmA"].state is ServerState.ONLINE
    with_joining = d.compute_spans(infos, ServerState.JOINING)
    assert (with_joining["QmJ"].start, with_joining["QmJ"].end) == (2, 5)
    assert d.compute_spans({}, ServerState.ONLINE) == {}


def test_compute_spans_state_changes_and_gaps():
    # a peer seen JOINING then ONLINE (records refreshed at different times): the higher state restarts the span
    infos = {0: {"QmA": server(ServerState.JOINING)}, 1: {"QmA": server()}, 2: {"QmA": server()}}
    span = d.compute_spans(infos, ServerState.JOINING)["QmA"]
    assert (span.start, span.end, span.state) == (1, 3, ServerState.ONLINE)
    # seen in a lower state after a higher one: ignored
    infos = {0: {"QmA": server()}, 1: {"QmA": server(ServerState.JOINING)}}
    span = d.compute_spans(infos, ServerState.JOINING)["QmA"]
    assert (span.start, span.end) == (0, 1)
    # like the client, a gap in the sightings is bridged (the end only ever grows) and a missing block is empty
    infos = {0: {"QmA": server()}, 1: {}, 3: {"QmA": server()}}
    span = d.compute_spans(infos, ServerState.ONLINE)["QmA"]
    assert (span.start, span.end) == (0, 4)
    # published start/end are trusted, then clipped to the looked-up range
    infos = {5: {"QmA": server(start=0, end=100)}, 6: {}}
    span = d.compute_spans(infos, ServerState.ONLINE)["QmA"]
    assert (span.start, span.end) == (5, 7)


def test_records_under_subkeys_that_cannot_be_peer_ids_are_skipped():
    """Any peer may store any subkey: an int one beside real peer ids broke every sort of the records (the
    announcer died, a node choosing its blocks could not start), and huge strings bloated our own records."""
    import asyncio
    from types import SimpleNamespace

    from protocol.dht_records import read_servers, to_tuple

    info = to_tuple(ServerInfo(state=ServerState.ONLINE, throughput=1.0))
    good = "QmWUBfS8Y8VeN6HEFXqZEwN6nrk2mxZELwpy7TuJLdU7oe"
    entries = {good: info, 7: info, b"raw": info, "0OIl": info, "Q" * 5000: info, "": info}
    record = SimpleNamespace(value={k: SimpleNamespace(value=v) for k, v in entries.items()})

    class DHT:
        async def get_many(self, uids, sufficient_expiration_time=None):
            return {uids[0]: record}

    found = asyncio.run(read_servers(DHT(), "m", 1))
    assert list(found[0]) == [good]
