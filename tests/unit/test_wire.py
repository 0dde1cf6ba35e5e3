"""protocol.wire and protocol.rpc_info against the recorded Petals traffic in shared/vectors, plus every error path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from hivemind.compression import base as hm_base
from hivemind.compression.quantization import Quantile8BitQuantization, Uniform8BitQuantization
from hivemind.compression.serialization import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from protocol import rpc_info, wire
from protocol.wire import RawTensor
from tests.helpers.paths import VECTORS

MODELS = VECTORS.parent / "models"
FAMILIES = ("llama", "bloom", "mixtral", "falcon")
MiB = 1024 * 1024


# --- helpers to walk the vectors ------------------------------------------------------------------


def from_json(value):
    """meta.json's rendering of msgpack values -> the Python values MSGPackSerializer gives."""
    if isinstance(value, list):
        return [from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(from_json(v) for v in value["__tuple__"])
        if set(value) == {"__bytes__"}:
            return value["__bytes__"].encode("ascii")
        if set(value) == {"__bytes_hex__"}:
            return bytes.fromhex(value["__bytes_hex__"])
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: from_json(v) for k, v in value.items()}
    return value


def scenarios():
    if not VECTORS.is_dir():
        return []
    return sorted(p for fam in FAMILIES for p in (VECTORS / fam).iterdir() if (p / "meta.json").is_file())


def calls():
    """(scenario dir, call meta) for every recorded call."""
    out = []
    for scen in scenarios():
        meta = json.loads((scen / "meta.json").read_text())
        for call in meta["calls"]:
            out.append((scen, call))
    return out


def call_id(item):
    scen, call = item
    return f"{scen.parent.name}/{scen.name}/{call['folder']}"


CALLS = calls()
STREAM_HANDLERS = ("rpc_forward_stream", "rpc_backward_stream")


def read_request(scen: Path, call: dict, req: dict):
    data = (scen / call["folder"] / req["file"]).read_bytes()
    msg = runtime_pb2.ExpertUID() if call["handler"] == "rpc_info" else runtime_pb2.ExpertRequest()
    msg.ParseFromString(data)
    return data, msg


def response_files(scen: Path, call: dict) -> list[Path]:
    return sorted((scen / call["folder"]).glob("*_response.pb"))


def family_of(scen: Path) -> str:
    return scen.parent.name


# --- requests: metadata, uids, args, tensors --------------------------------------------------------


@pytest.mark.parametrize("item", CALLS, ids=call_id)
def test_recorded_requests_decode(item):
    scen, call = item
    prefix = f"micro-{family_of(scen)}"
    assembler = wire.StreamAssembler()
    stream_tensors = []
    for req in call["requests"]:
        data, msg = read_request(scen, call, req)
        assert len(data) == req["len"]
        if call["handler"] == "rpc_info":
            assert msg.uid == req["uid"]
            assert wire.parse_chain(msg.uid, prefix) == [int(msg.uid.rsplit(".", 1)[1])]
            continue
        if not data:  # the client's close message: an empty ExpertRequest
            assert wire.unpack_metadata(msg.metadata) == {} and not msg.tensors
            continue

        # metadata: decodes to what meta.json shows, and packs back to the same bytes
        metadata = wire.unpack_metadata(msg.metadata)
        assert metadata == from_json(req["metadata_decoded"]) == MSGPackSerializer.loads(msg.metadata)
        if "metadata_hex" in req:
            assert msg.metadata == bytes.fromhex(req["metadata_hex"])
        assert wire.pack_metadata(metadata) == msg.metadata

        # uid chain
        assert msg.uid == req["uid"]
        names = msg.uid.split(" ")
        indices = wire.parse_chain(msg.uid, prefix)
        assert indices == [int(n.rsplit(".", 1)[1]) for n in names]
        if any(i >= 4 for i in indices):  # the unknown-uid scenarios
            with pytest.raises(ValueError, match=r"^Remote peer does not serve micro-llama\.99$"):
                wire.check_served(indices, 0, 4, msg.uid)
        else:
            wire.check_served(indices, 0, 4, msg.uid)

        # tensors: descriptors as recorded
        assert len(msg.tensors) == len(req["tensors"])
        for part, desc in zip(msg.tensors, req["tensors"]):
            assert part.dtype == desc["dtype"] and list(part.size) == desc["size"]
            assert part.chunks == desc["chunks"] and len(part.buffer) == desc["buffer_len"]
            assert runtime_pb2.CompressionType.Name(part.compression) == desc["compression"]
        if call["handler"] in STREAM_HANDLERS:
            stream_tensors += assembler.feed(msg.tensors)
            continue
        raws = [wire.decode_tensor(t, f"tensor {i}") for i, t in enumerate(msg.tensors)]
        for raw, desc in zip(raws, req["tensors"]):
            assert raw.dtype == desc["dtype"] and raw.shape == tuple(desc["size"]) and raw.nbytes == desc["buffer_len"]
        args = wire.resolve_args(raws, metadata.get("args_structure"))
        assert len(args) == len(raws) and all(a is r for a, r in zip(args, raws))

    if call["handler"] in STREAM_HANDLERS:
        assembler.finish()
        first = wire.unpack_metadata(read_request(scen, call, call["requests"][0])[1].metadata)
        raws = [wire.decode_tensor(t) for t in stream_tensors]
        args = wire.resolve_args(raws, first["args_structure"])
        expected_shapes = [tuple(d["size"]) for r in call["requests"] for d in r["tensors"]]
        assert [a.shape for a in args] == expected_shapes


LOCATION = re.compile(r"^(c\d+_\w+)/(\d+_(?:request|response)\.pb) tensors\[(\d+)\](?: == (\w+)\[(\d+):(\d+)\])?$")


def wire_locations():
    out = []
    for scen in scenarios():
        meta = json.loads((scen / "meta.json").read_text())
        for name, locations in (meta.get("tensor_wire_locations") or {}).items():
            for loc in locations:
                out.append((scen, name, loc))
    return out


@pytest.mark.parametrize("item", wire_locations(), ids=lambda it: f"{it[0].parent.name}/{it[0].name}/{it[1]}@{it[2]}")
def test_recorded_tensor_values(item):
    """Tensors decode bit-for-bit to the client-side tensors in tensors.safetensors."""
    from safetensors.numpy import load_file

    scen, name, location = item
    m = LOCATION.match(location)
    assert m, location
    folder, file, index, sliced_name, lo, hi = m.groups()
    msg = runtime_pb2.ExpertResponse() if "response" in file else runtime_pb2.ExpertRequest()
    msg.ParseFromString((scen / folder / file).read_bytes())
    raw = wire.decode_tensor(msg.tensors[int(index)])
    expected = load_file(str(scen / "tensors.safetensors"))[name]
    if sliced_name:
        assert sliced_name == name
        expected = expected[int(lo) : int(hi)]
    assert raw.shape == expected.shape and raw.dtype == str(expected.dtype)
    assert raw.tobytes() == np.ascontiguousarray(expected).tobytes()
    np.testing.assert_array_equal(wire.to_torch(raw).numpy(), expected)


# --- responses: decode and re-encode to the same bytes -----------------------------------------------


@pytest.mark.parametrize("item", [c for c in CALLS if c[1]["handler"] != "rpc_info"], ids=call_id)
def test_recorded_responses_reencode_identically(item):
    scen, call = item
    files = response_files(scen, call)
    assert len(files) == len(call["responses"])
    recorded = [f.read_bytes() for f in files]
    messages = []
    for data in recorded:
        msg = runtime_pb2.ExpertResponse()
        msg.ParseFromString(data)
        assert msg.metadata == b""  # responses never carry metadata
        messages.append(msg)

    if call["handler"] in STREAM_HANDLERS:  # one part per message: reassemble, re-encode, re-split
        assembler = wire.StreamAssembler()
        tensors = [t for msg in messages for t in assembler.feed(msg.tensors)]
        assembler.finish()
        parts = [p for t in tensors for p in wire.split_for_stream(wire.encode_tensor(wire.decode_tensor(t)))]
        ours = [runtime_pb2.ExpertResponse(tensors=[p]).SerializeToString() for p in parts]
    else:
        ours = [
            runtime_pb2.ExpertResponse(
                tensors=[wire.encode_tensor(wire.decode_tensor(t)) for t in msg.tensors]
            ).SerializeToString()
            for msg in messages
        ]
    assert ours == recorded


# --- rpc_info -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_rpc_info_matches_recording(family):
    data = (VECTORS / family / "01_rpc_info" / "c0_rpc_info" / "000_response.pb").read_bytes()
    info = runtime_pb2.ExpertInfo()
    info.ParseFromString(data)
    recorded = MSGPackSerializer.loads(info.serialized_info)
    config = json.loads((MODELS / f"micro-{family}" / "config.json").read_text())

    block = rpc_info.block_schemas(config["hidden_size"], "float32", 0)
    ours = rpc_info.encode_rpc_info(
        version=recorded["version"],
        dht_client_mode=recorded["dht_client_mode"],
        cache_tokens_available=recorded["cache_tokens_available"],
        block=block,
    )
    decoded = rpc_info.decode_rpc_info(ours)
    assert decoded == recorded  # BatchTensorDescriptor compares field by field
    assert list(decoded) == list(recorded)  # same key order
    assert ours == info.serialized_info  # and the very same bytes
    assert runtime_pb2.ExpertInfo(serialized_info=ours).SerializeToString() == data

    # what the client reads
    assert decoded["forward_schema"][0][0].compression == 0 and decoded["forward_schema"][1] == {}
    assert len(decoded["outputs_schema"]) == 1 and decoded["keyword_names"] == ()
    assert [d.size for d in decoded["inference_schema"][0]] == [(None, 1, 2048, 64), (None,), (None,)]


def test_rpc_info_variants_and_errors():
    server_only = rpc_info.decode_rpc_info(
        rpc_info.encode_rpc_info(version="x", dht_client_mode=True, cache_tokens_available=7, block=None)
    )
    assert server_only == {"version": "x", "dht_client_mode": True, "cache_tokens_available": 7}

    block = rpc_info.block_schemas(4096, "torch.bfloat16", runtime_pb2.CompressionType.FLOAT16)
    decoded = rpc_info.decode_rpc_info(
        rpc_info.encode_rpc_info(version="x", dht_client_mode=False, cache_tokens_available=1, block=block)
    )
    hidden, prompts, hypo = decoded["inference_schema"][0]
    assert hidden == BatchTensorDescriptor(1, 2048, 4096, dtype=torch.bfloat16, compression=2)
    assert prompts.dtype == torch.bfloat16 and prompts.compression == 0 and prompts.size == (None,)
    assert hypo.dtype == torch.int64 and hypo.compression == 0
    assert decoded["outputs_schema"] == (hidden,)

    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        rpc_info.block_schemas(64, "float8", 0)
    with pytest.raises(ValueError, match="unknown compression type 9"):
        rpc_info.block_schemas(64, "float32", 9)
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        rpc_info.block_schemas(0, "float32", 0)
    with pytest.raises(ValueError, match=r"may not override the server keys \['version'\]"):
        rpc_info.encode_rpc_info(version="x", dht_client_mode=False, cache_tokens_available=1, block={"version": "y"})
    with pytest.raises(TypeError, match="cache_tokens_available must be an int"):
        rpc_info.encode_rpc_info(version="x", dht_client_mode=False, cache_tokens_available=1.0, block=None)
    with pytest.raises(TypeError, match="dht_client_mode must be a bool"):
        rpc_info.encode_rpc_info(version="x", dht_client_mode=0, cache_tokens_available=1, block=None)
    with pytest.raises(ValueError, match="cache_tokens_available must be >= 0"):
        rpc_info.encode_rpc_info(version="x", dht_client_mode=False, cache_tokens_available=-1, block=None)
    with pytest.raises(ValueError, match="rpc_info must be a msgpack map, got list"):
        rpc_info.decode_rpc_info(MSGPackSerializer.dumps([1]))
    with pytest.raises(ValueError, match="rpc_info is not valid msgpack"):
        rpc_info.decode_rpc_info(b"\xc1")
    with pytest.raises(ValueError, match="rpc_info is not valid msgpack: ValueError: msgpack value nests more than 16"):
        rpc_info.decode_rpc_info(_nested_tuples(300))  # would crash MSGPackSerializer.loads


# --- tensors: interop with hivemind's serializer ------------------------------------------------------

SAMPLES = {
    "float32": torch.randn(3, 5),
    "float16": torch.randn(2, 3).half(),
    "bfloat16": torch.randn(4, 2, 3).bfloat16(),
    "float64": torch.randn(7).double(),
    "int64": torch.tensor([1, -2, 2**40]),
    "int32": torch.tensor([[1, -2], [3, 2**30]], dtype=torch.int32),
    "int16": torch.tensor([1, -2, 300], dtype=torch.int16),
    "int8": torch.tensor([1, -2, 100], dtype=torch.int8),
    "uint8": torch.tensor([0, 255, 7], dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
}


@pytest.mark.parametrize("dtype", list(SAMPLES))
def test_none_roundtrip_matches_hivemind(dtype, monkeypatch):
    tensor = SAMPLES[dtype]
    monkeypatch.setattr(hm_base, "USE_LEGACY_BFLOAT16", False)  # what Petals sets
    theirs = serialize_torch_tensor(tensor)
    raw = wire.decode_tensor(theirs)
    assert raw == RawTensor(dtype, tuple(tensor.shape), theirs.buffer)
    assert type(raw.data) is bytes and len(raw.data) == tensor.numel() * tensor.element_size()
    assert torch.equal(wire.to_torch(raw), tensor)
    ours = wire.encode_tensor(raw)
    assert ours.SerializeToString() == theirs.SerializeToString()
    assert torch.equal(deserialize_torch_tensor(ours), tensor)
    assert wire.encode_tensor(wire.from_torch(tensor)).SerializeToString() == theirs.SerializeToString()


def test_legacy_bfloat16_is_converted(monkeypatch):
    tensor = torch.randn(3, 4).bfloat16()
    monkeypatch.setattr(hm_base, "USE_LEGACY_BFLOAT16", True)  # plain hivemind's default: fp32 upcast
    legacy = serialize_torch_tensor(tensor)
    assert len(legacy.buffer) == tensor.numel() * 4
    raw = wire.decode_tensor(legacy)
    assert raw.dtype == "bfloat16" and raw.nbytes == len(raw.data) == tensor.numel() * 2
    assert torch.equal(wire.to_torch(raw), tensor)
    # values that are not bf16-representable round like hivemind's own decoder does
    odd = torch.tensor([1.0 + 2**-9, 1.0 + 3 * 2**-9, -3.1415926, 1e-40, float("inf")], dtype=torch.float32)
    hostile = runtime_pb2.Tensor(buffer=odd.numpy().tobytes(), size=[5], dtype="bfloat16")
    assert torch.equal(wire.to_torch(wire.decode_tensor(hostile)), deserialize_torch_tensor(hostile))


def _reference_decode(serialized, tensor, compression: str) -> torch.Tensor:
    """What hivemind decodes `serialized` (= hivemind's encoding of `tensor`) to."""
    try:
        return deserialize_torch_tensor(serialized)
    except TypeError as e:
        # hivemind 1.1.12 reads the 8-bit formats' int64 headers with int(<1-element array>), which
        # numpy >= 2.4 refuses; rebuild its result from its own quantizer's (codes, codebook) instead
        assert "0-dimensional" in str(e) and compression.endswith("8BIT"), e
    if compression == "BLOCKWISE_8BIT":
        from bitsandbytes.functional import dequantize_blockwise, quantize_blockwise

        codes, state = quantize_blockwise(tensor, blocksize=4096, nested=False)
        return dequantize_blockwise(codes, absmax=state.absmax, code=state.code, blocksize=4096, nested=False)
    quantizer = {"QUANTILE_8BIT": Quantile8BitQuantization, "UNIFORM_8BIT": Uniform8BitQuantization}[compression]()
    codes, codebook = quantizer.quantize(tensor)
    return torch.as_tensor(codebook)[torch.as_tensor(codes).long()].reshape(tensor.shape)


@pytest.mark.parametrize("compression", ["FLOAT16", "MEANSTD_16BIT", "QUANTILE_8BIT", "UNIFORM_8BIT", "BLOCKWISE_8BIT"])
def test_compressed_tensors(compression):
    code = runtime_pb2.CompressionType.Value(compression)
    tensor = torch.randn(4, 8, 1000)  # 32000 values: 8 blocks of 4096 for BLOCKWISE_8BIT
    try:
        theirs = serialize_torch_tensor(tensor, code)
    except Exception as e:  # BLOCKWISE_8BIT needs a bitsandbytes hivemind can drive
        pytest.skip(f"hivemind cannot serialize {compression} here: {e!r}")
    raw = wire.decode_tensor(theirs)
    assert raw.dtype == "float32" and raw.shape == (4, 8, 1000)
    assert torch.equal(wire.to_torch(raw), _reference_decode(theirs, tensor, compression))
    ours = wire.encode_tensor(wire.from_torch(tensor), code)
    assert ours.compression == code and tuple(ours.size) == (4, 8, 1000)
    back = wire.to_torch(wire.decode_tensor(ours))
    tolerance = {"FLOAT16": 1e-3, "MEANSTD_16BIT": 1e-3}.get(compression, 0.05)
    assert (back - tensor).abs().mean() < tolerance
    assert ours.SerializeToString() == theirs.SerializeToString()  # all five are deterministic
    # the declared dtype is the output dtype, as in hivemind
    half = wire.decode_tensor(
        runtime_pb2.Tensor(buffer=theirs.buffer, size=theirs.size, dtype="float16", compression=code)
    )
    assert half.dtype == "float16" and half.shape == raw.shape


def test_quantized_decode_errors():
    def q(buffer, size=(2, 2), compression=runtime_pb2.UNIFORM_8BIT):
        return runtime_pb2.Tensor(buffer=buffer, size=size, dtype="float32", compression=compression)

    header = np.int64(2).tobytes() + np.float32([0.5, -1.0]).tobytes()
    decoded = wire.to_torch(wire.decode_tensor(q(header + bytes([0, 1, 1, 0]))))
    assert decoded.tolist() == [[0.5, -1.0], [-1.0, 0.5]]
    with pytest.raises(
        ValueError,
        match=r"^cannot decode UNIFORM_8BIT tensor float32\[2, 2\]: code 2 is outside the codebook of 2 values$",
    ):
        wire.decode_tensor(q(header + bytes([0, 1, 2, 0])))
    with pytest.raises(ValueError, match=r"buffer has 19 bytes, its header \[2\] implies 20"):
        wire.decode_tensor(q(header + bytes([0, 1, 1])))
    with pytest.raises(ValueError, match=r"header has negative table lengths \[-1\]"):
        wire.decode_tensor(q(np.int64(-1).tobytes()))
    with pytest.raises(ValueError, match=r"buffer of 3 bytes is too short for its header"):
        wire.decode_tensor(q(b"abc", compression=runtime_pb2.QUANTILE_8BIT))
    blockwise = np.int64(2).tobytes() + np.int64(1).tobytes() + np.float32([1, 2, 3]).tobytes() + bytes(4)
    with pytest.raises(
        ValueError, match=r"BLOCKWISE_8BIT tensor float32\[2, 2\]: 2 absmax values for 1 blocks of 4096"
    ):
        wire.decode_tensor(q(blockwise, compression=runtime_pb2.BLOCKWISE_8BIT))


def test_zero_copy_views():
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    raw = wire.from_torch(tensor)
    tensor[0, 0] = 42.0  # the RawTensor views the tensor's memory
    assert np.frombuffer(raw.data, dtype=np.float32)[0] == 42.0
    buf = bytearray(np.arange(4, dtype=np.int64).tobytes())
    view = wire.to_torch(RawTensor("int64", (2, 2), buf))
    buf[0] = 9  # the tensor views the buffer
    assert view[0, 0].item() == 9
    # non-contiguous and scalar tensors, bool, empty
    assert torch.equal(wire.to_torch(wire.from_torch(tensor.t())), tensor.t())
    assert wire.from_torch(torch.tensor(3.5)).shape == ()
    assert torch.equal(wire.to_torch(wire.from_torch(torch.tensor(3.5))), torch.tensor(3.5))
    empty = wire.from_torch(torch.zeros(0, 5))
    assert empty.data == b"" and wire.to_torch(empty).shape == (0, 5)
    assert wire.to_torch(wire.decode_tensor(wire.encode_tensor(empty))).shape == (0, 5)


def test_decode_tensor_errors():
    def t(**kw):
        fields = dict(buffer=b"\0" * 16, size=[2, 2], dtype="float32")
        fields.update(kw)
        return runtime_pb2.Tensor(**fields)

    with pytest.raises(ValueError, match=r"^tensor 1: buffer has 12 bytes, expected 16 for float32\[2, 2\]$"):
        wire.decode_tensor(t(buffer=b"\0" * 12), "tensor 1")
    with pytest.raises(
        ValueError, match=r"^buffer has 6 bytes, expected 8 \(or 16 in the legacy float32 form\) for bfloat16\[2, 2\]$"
    ):
        wire.decode_tensor(t(buffer=b"\0" * 6, dtype="bfloat16"))
    with pytest.raises(ValueError, match=r"unsupported dtype 'complex64' \(expected one of float32, "):
        wire.decode_tensor(t(dtype="complex64"))
    with pytest.raises(ValueError, match="tensor has no dtype"):
        wire.decode_tensor(t(dtype=""))
    with pytest.raises(ValueError, match="^unknown compression type 9$"):
        wire.decode_tensor(t(compression=9))
    with pytest.raises(ValueError, match=r"absurd dimension 4294967295"):
        wire.decode_tensor(t(size=[2**32 - 1, 0]))
    with pytest.raises(ValueError, match=r"tensor has 40 dimensions, at most 32"):
        wire.decode_tensor(t(size=[1] * 40, buffer=b"\0" * 4))
    with pytest.raises(ValueError, match="FLOAT16 compression applies to floating point tensors, not int64"):
        wire.decode_tensor(t(dtype="int64", compression=runtime_pb2.FLOAT16))
    with pytest.raises(
        ValueError,
        match=r"cannot decode QUANTILE_8BIT tensor float32\[2, 2\]: header has negative table lengths \[-1\]",
    ):
        wire.decode_tensor(t(buffer=b"\xff" * 8 + b"\0" * 4, compression=runtime_pb2.QUANTILE_8BIT))
    with pytest.raises(ValueError, match=r"cannot decode MEANSTD_16BIT tensor float32\[\]: "):
        wire.decode_tensor(t(size=[], buffer=b"\0" * 2, compression=runtime_pb2.MEANSTD_16BIT))
    # 16-bit buffers are measured before hivemind converts them: a [0]-shaped one of 16 MiB took 80 MiB
    with pytest.raises(ValueError, match=r"^FLOAT16 tensor float32\[2, 2\] needs 8 bytes, got 6$"):
        wire.decode_tensor(t(buffer=b"\0" * 6, compression=runtime_pb2.FLOAT16))
    with pytest.raises(ValueError, match=r"^FLOAT16 tensor float32\[0\] needs 0 bytes, got 16777216$"):
        wire.decode_tensor(t(size=[0], buffer=b"\0" * (16 << 20), compression=runtime_pb2.FLOAT16))
    with pytest.raises(ValueError, match=r"^MEANSTD_16BIT tensor float32\[2, 2\] needs 24 bytes, got 8$"):
        wire.decode_tensor(t(buffer=b"\0" * 8, compression=runtime_pb2.MEANSTD_16BIT))
    # a zero-sized tensor with a huge other dimension is fine: no bytes
    assert wire.decode_tensor(t(size=[0, 2**31 - 1], buffer=b"")).numel == 0


def test_encode_and_convert_errors():
    ok = RawTensor("float32", (2,), b"\0" * 8)
    with pytest.raises(ValueError, match="^unknown compression type 7$"):
        wire.encode_tensor(ok, 7)
    with pytest.raises(ValueError, match="^unknown compression type True$"):
        wire.encode_tensor(ok, True)
    with pytest.raises(ValueError, match=r"^buffer has 8 bytes, expected 12 for float32\[3\]$"):
        wire.encode_tensor(RawTensor("float32", (3,), b"\0" * 8))
    with pytest.raises(ValueError, match=r"shape float32\[-1, 2\] has a negative dimension"):
        wire.encode_tensor(RawTensor("float32", (-1, 2), b""))
    with pytest.raises(ValueError, match=r"non-integer dimension 2.0"):
        wire.encode_tensor(RawTensor("float32", (2.0,), b"\0" * 8))
    with pytest.raises(ValueError, match="unsupported dtype 'float8'"):
        wire.encode_tensor(RawTensor("float8", (1,), b"\0"))
    with pytest.raises(ValueError, match="FLOAT16 compression applies to floating point tensors, not int64"):
        wire.encode_tensor(RawTensor("int64", (1,), b"\0" * 8), runtime_pb2.FLOAT16)
    with pytest.raises(ValueError, match=r"cannot encode bfloat16\[2\] with FLOAT16: ValueError: .*does not support"):
        wire.encode_tensor(RawTensor("bfloat16", (2,), b"\0" * 4), runtime_pb2.FLOAT16)
    with pytest.raises(ValueError, match=r"buffer has 8 bytes, expected 4 for float32\[1\]"):
        wire.to_torch(RawTensor("float32", (1,), b"\0" * 8))
    with pytest.raises(ValueError, match="unsupported dtype 'complex64'"):
        wire.from_torch(torch.zeros(2, dtype=torch.complex64))
    # memoryview data of any format is taken byte for byte
    mv = memoryview(np.arange(3, dtype=np.float32))
    assert wire.encode_tensor(RawTensor("float32", (3,), mv)).buffer == mv.tobytes()


# --- streaming ------------------------------------------------------------------------------------------


def _big(nbytes: int) -> runtime_pb2.Tensor:
    values = torch.arange(nbytes // 4, dtype=torch.float32)
    return wire.encode_tensor(wire.from_torch(values))


@pytest.mark.parametrize("nbytes, parts", [(10 * MiB + 4, 3), (8 * MiB, 2), (4 * MiB, 1), (1000, 1)])
def test_split_and_assemble(nbytes, parts):
    tensor = _big(nbytes)
    split = wire.split_for_stream(tensor)
    assert len(split) == parts
    # byte for byte what hivemind sends
    theirs = list(split_for_streaming(tensor, 4 * MiB))
    assert [p.SerializeToString() for p in split] == [p.SerializeToString() for p in theirs]
    head = split[0]
    assert head.chunks == parts and head.dtype == "float32" and list(head.size) == [nbytes // 4]
    assert len(head.buffer) == min(nbytes, 4 * MiB)
    for part in split[1:]:  # continuation parts carry only the buffer
        assert [f.name for f, _ in part.ListFields()] == ["buffer"]
    # one part per message, as the *_stream handlers send them
    assembler = wire.StreamAssembler()
    done = []
    for i, part in enumerate(split):
        done += assembler.feed([part])
        assert assembler.pending == (i < parts - 1)
    assembler.finish()
    assert len(done) == 1 and done[0].buffer == tensor.buffer and done[0].chunks == parts
    assert wire.decode_tensor(done[0]) == wire.decode_tensor(tensor)
    assert combine_from_streaming(split).buffer == done[0].buffer


def test_stream_empty_and_unsplit_tensors():
    empty = wire.encode_tensor(RawTensor("float32", (0,), b""))
    split = wire.split_for_stream(empty)
    assert len(split) == 1 and split[0].chunks == 0 and split[0].dtype == "float32" and split[0].buffer == b""
    assert [p.SerializeToString() for p in split] == [
        p.SerializeToString() for p in split_for_streaming(empty, 4 * MiB)
    ]
    hidden = _big(64 * 4)
    parts = wire.split_for_stream(_big(9 * MiB), 4 * MiB)
    assembler = wire.StreamAssembler()
    # rpc_inference style: whole tensors with chunks = 0 in one message, then a split tensor over
    # three messages, with an empty tensor sharing the last message
    first = assembler.feed([hidden, split[0], runtime_pb2.Tensor(buffer=b"\0" * 8, size=[1], dtype="int64")])
    assert [t.dtype for t in first] == ["float32", "float32", "int64"] and first[0] is hidden
    assert assembler.feed(parts[:2]) == [] and assembler.pending
    last = assembler.feed([parts[2], split[0]])
    assert [len(t.buffer) for t in last] == [9 * MiB, 0]
    assembler.finish()
    assert not assembler.pending


def test_stream_errors():
    parts = wire.split_for_stream(_big(9 * MiB))
    with pytest.raises(ValueError, match="^stream part without a dtype before any tensor header$"):
        wire.StreamAssembler().feed([parts[1]])
    assembler = wire.StreamAssembler()
    assembler.feed([_big(16)])
    with pytest.raises(ValueError, match="^stream part without a dtype after tensor 0 was already complete$"):
        assembler.feed([parts[1]])
    assembler = wire.StreamAssembler()
    assembler.feed(parts[:2])
    with pytest.raises(ValueError, match="^tensor 0 is incomplete: 2 of 3 parts received at the end of the stream$"):
        assembler.finish()
    with pytest.raises(ValueError, match="^tensor 0 is incomplete: 2 of 3 parts received when the next tensor began$"):
        assembler.feed([_big(16)])
    negative = runtime_pb2.Tensor(dtype="float32", size=[1], buffer=b"\0" * 4, chunks=-2)
    with pytest.raises(ValueError, match="^tensor 0: negative chunk count -2$"):
        wire.StreamAssembler().feed([negative])
    with pytest.raises(ValueError, match=r"^tensor 0 exceeds 5000000 bytes$"):
        wire.StreamAssembler(max_tensor_bytes=5_000_000).feed(parts)
    with pytest.raises(ValueError, match="chunk_bytes must be a positive int, got 0"):
        wire.split_for_stream(_big(16), 0)
    with pytest.raises(ValueError, match="cannot stream a tensor without a dtype"):
        wire.split_for_stream(runtime_pb2.Tensor(buffer=b"abc"))


# --- metadata -------------------------------------------------------------------------------------------


def test_metadata():
    assert wire.unpack_metadata(b"") == {}
    value = {"points": 0.0, "args_structure": ((b"__T0", b"__T1"), {}), "next_servers": [("peer", "sid", 1, 3)]}
    packed = wire.pack_metadata(value)
    assert packed == MSGPackSerializer.dumps(value)
    assert wire.unpack_metadata(packed) == value  # tuples stay tuples, lists stay lists
    with pytest.raises(ValueError, match=r"^metadata is not valid msgpack: .*"):
        wire.unpack_metadata(b"\xc1")  # a reserved byte
    with pytest.raises(ValueError, match=r"^metadata is not valid msgpack: .*"):
        wire.unpack_metadata(b"\x81\xa1a")  # truncated map
    with pytest.raises(ValueError, match=r"^metadata is not valid msgpack: ExtraData"):
        wire.unpack_metadata(b"\x80\x80")
    with pytest.raises(ValueError, match=r"^metadata is not valid msgpack: "):
        wire.unpack_metadata(b"\x81\xa1a\xa3\xff\xfe\xfd")  # invalid UTF-8 string
    with pytest.raises(ValueError, match=r"^metadata must be a msgpack map, got list$"):
        wire.unpack_metadata(MSGPackSerializer.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"^metadata must be a msgpack map, got tuple$"):
        wire.unpack_metadata(MSGPackSerializer.dumps((1, 2)))


def _nested_tuples(depth: int) -> bytes:
    value = msgpack.packb(1)
    for _ in range(depth):
        value = msgpack.packb(msgpack.ExtType(0x40, b"\x91" + value))  # a 1-tuple holding the previous value
    return b"\x81\xa1a" + value  # {"a": (((...),),)}


def test_metadata_nesting_limits():
    # MSGPackSerializer.loads recurses through the C stack once per tuple level and dies with SIGSEGV
    # after ~200 levels; safe_loads stops at MAX_MSGPACK_DEPTH
    ok = wire.unpack_metadata(_nested_tuples(wire.MAX_MSGPACK_DEPTH))
    assert ok == MSGPackSerializer.loads(_nested_tuples(wire.MAX_MSGPACK_DEPTH))
    with pytest.raises(
        ValueError, match=r"^metadata is not valid msgpack: ValueError: msgpack value nests more than 16 tuples deep$"
    ):
        wire.unpack_metadata(_nested_tuples(5000))
    with pytest.raises(ValueError, match=r"^metadata is not valid msgpack: StackError"):
        wire.unpack_metadata(b"\x81\xa1a" + b"\x91" * 60_000)  # plain arrays: msgpack's own limit
    # empty maps are a byte each and ~64 bytes decoded: metadata is refused by size before it is decoded
    bomb = b"\x81\xa1a\xdd" + (4 << 20).to_bytes(4, "big") + b"\x80" * (4 << 20)
    with pytest.raises(ValueError, match=r"^metadata of 4194312 bytes exceeds the limit of 65536$"):
        wire.unpack_metadata(bomb)
    # ext types other than tuples are not decoded in metadata
    assert wire.unpack_metadata(msgpack.packb({"x": msgpack.ExtType(0x51, b"\x80")})) == {
        "x": msgpack.ExtType(0x51, b"\x80")
    }
    with pytest.raises(ValueError, match=r"^metadata is not valid msgpack: TypeError"):
        wire.unpack_metadata(msgpack.packb({"x": msgpack.ExtType(0x40, msgpack.packb(5))}))  # a "tuple" of an int


# --- args_structure -------------------------------------------------------------------------------------


def test_resolve_args():
    a, b, c = (RawTensor("float32", (1,), b"\0" * 4) for _ in range(3))
    assert wire.resolve_args([a, b], None) == [a, b]
    assert wire.resolve_args([a, b, c], ((b"__T0", b"__T2"), {})) == [a, c]
    nested = wire.resolve_args([a, b, c], ((b"__T2", (b"__T0", [b"__T1", b"__T1"])), {"ignored": b"__T9"}))
    assert nested[0] is c and nested[1][0] is a and nested[1][1] == [b, b]
    assert isinstance(nested[1], tuple) and isinstance(nested[1][1], list)
    assert wire.resolve_args([a], [[b"__T0"], {}]) == [a]  # lists in place of tuples are tolerated


@pytest.mark.parametrize(
    "structure, message",
    [
        (((b"__T0",), {}, {}), r"^args_structure must be a pair \(args, kwargs\), got "),
        ("__T0", r"^args_structure must be a pair \(args, kwargs\), got '__T0'"),
        ({"args": 1}, r"^args_structure must be a pair \(args, kwargs\), got \{"),
        (({}, {}), r"^args_structure: args must be a tuple, got dict$"),
        (((b"__T0",), ()), r"^args_structure: kwargs must be a map, got tuple$"),
        (((b"__T5",), {}), r"^args_structure refers to tensor 5 but the request has 2 tensors$"),
        (((b"__Tx",), {}), r"^args_structure leaf b'__Tx' is not a tensor reference b'__T<i>'$"),
        (((b"__T",), {}), r"^args_structure leaf b'__T' is not a tensor reference"),
        (((b"__T-1",), {}), r"^args_structure leaf b'__T-1' is not a tensor reference"),
        ((("__T0",), {}), r"^args_structure leaf '__T0' is not a tensor reference"),
        (((None,), {}), r"^args_structure leaf None is not a tensor reference"),
        (((1.5,), {}), r"^args_structure leaf 1.5 is not a tensor reference"),
        ((((((((((((b"__T0",),),),),),),),),),), {}), r"^args_structure is nested too deeply$"),
    ],
)
def test_resolve_args_errors(structure, message):
    tensors = [RawTensor("float32", (1,), b"\0" * 4)] * 2
    with pytest.raises(ValueError, match=message):
        wire.resolve_args(tensors, structure)


# --- uid chains -----------------------------------------------------------------------------------------


def test_parse_chain():
    assert wire.parse_chain("micro-llama.0", "micro-llama") == [0]
    assert wire.parse_chain("micro-llama.1 micro-llama.2 micro-llama.3", "micro-llama") == [1, 2, 3]
    assert wire.parse_chain("org/Mixtral-8x7B-v0-1.31", "org/Mixtral-8x7B-v0-1") == [31]
    wire.check_served([1, 2], 0, 4, "p.1 p.2")


@pytest.mark.parametrize(
    "uid, message",
    [
        ("", r"^Remote peer does not serve an empty uid$"),
        ("other.0", r"^Remote peer does not serve other\.0$"),
        ("micro-llama.0 other.1", r"^Remote peer does not serve other\.1$"),
        ("micro-llama-x.0", r"^Remote peer does not serve micro-llama-x\.0$"),
        ("micro-llama", r"^Remote peer does not serve micro-llama$"),
        ("micro-llama.", r"^Remote peer does not serve micro-llama\.$"),
        ("micro-llama.x", r"^Remote peer does not serve micro-llama\.x$"),
        ("micro-llama.-1", r"^Remote peer does not serve micro-llama\.-1$"),
        ("micro-llama.01", r"^Remote peer does not serve micro-llama\.01$"),
        ("micro-llama.1.5", r"^Remote peer does not serve micro-llama\.1\.5$"),
        ("micro-llama.\u0661", r"^Remote peer does not serve micro-llama\.\u0661$"),  # arabic-indic one
        ("micro-llama.0  micro-llama.1", r"has an empty element: uids must be separated by single spaces$"),
        ("micro-llama.0 ", r"has an empty element"),
        ("micro-llama.0 micro-llama.2", r"^blocks of a chain must be consecutive and increasing, got "),
        ("micro-llama.2 micro-llama.1", r"^blocks of a chain must be consecutive and increasing"),
        ("micro-llama.1 micro-llama.1", r"^blocks of a chain must be consecutive and increasing"),
    ],
)
def test_parse_chain_errors(uid, message):
    with pytest.raises(ValueError, match=message):
        wire.parse_chain(uid, "micro-llama")


def test_check_served_names_the_block():
    with pytest.raises(ValueError, match=r"^Remote peer does not serve p\.4$"):
        wire.check_served([2, 3, 4], 0, 4, "p.2 p.3 p.4")
    with pytest.raises(ValueError, match=r"^Remote peer does not serve p\.1$"):
        wire.check_served([1, 2], 2, 6, "p.1 p.2")


def test_import_is_cheap():
    """protocol.wire, dht_records and rpc_info import neither torch nor hivemind at module level."""
    import subprocess
    import sys

    code = (
        "import sys, protocol.wire, protocol.dht_records, protocol.rpc_info;"
        "print(sorted(m for m in ('torch', 'hivemind', 'numpy') if m in sys.modules))"
    )
    from tests.helpers.paths import ROOT

    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_absent_argument_s_empty_tensor_has_bounded_dimensions():
    """Torch could not even describe an empty tensor of (0, 2**31 - 1, 2**31 - 1, 2**31 - 1): its strides
    overflowed, and the runtime logged a traceback as a bug for each such request."""
    from types import SimpleNamespace

    from protocol.request_checks import optional_tensor

    assert optional_tensor(SimpleNamespace(shape=(0,))) is None
    assert optional_tensor(SimpleNamespace(shape=(0, 1, 16, 4096))) is None
    with pytest.raises(ValueError, match="other dimensions are absurd"):
        optional_tensor(SimpleNamespace(shape=(0, 2**31 - 1, 2**31 - 1, 2**31 - 1)))
