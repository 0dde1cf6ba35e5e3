"""Two nodes in one swarm, each holding half of micro-llama: chains, pushes and DHT refreshes."""

from __future__ import annotations

import asyncio
import copy
import time
import uuid

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from node.client.swarm import ARGS_3, Client, _decode, _request
from node.tools.launcher import NodeProcess
from tests.helpers.paths import MICRO_LLAMA
from tests.helpers.reference import hf_blocks, rel_err

TOL = 1e-5


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    base = tmp_path_factory.mktemp("swarm")
    first = NodeProcess(MICRO_LLAMA, base / "a", "--block_indices", "0:2", "--update_period", "2").start()
    second = None
    try:
        second = NodeProcess(
            MICRO_LLAMA, base / "b", "--block_indices", "2:4", "--initial_peers", *first.maddrs
        ).start()
        yield first, second
    finally:
        if second is not None:
            second.stop()
        first.stop()


@pytest.fixture(scope="module")
def client(swarm):
    first, second = swarm
    with Client(first.maddrs, "micro-llama") as client:
        deadline = time.monotonic() + 30
        while len(client.spans(4)) < 2:  # the second node's records reach the DHT
            assert time.monotonic() < deadline, "the second node never appeared in the DHT"
            time.sleep(0.5)
        yield client


def test_both_spans_are_announced(client, swarm):
    first, second = swarm
    spans = {(s.peer_id, s.start, s.end) for s in client.spans(4)}
    assert spans == {(first.peer_id, 0, 2), (second.peer_id, 2, 4)}


def test_forward_and_backward_through_a_chain_of_nodes(client, micro_hf):
    torch.manual_seed(11)
    hidden, grad_out = torch.randn(2, 6, 64), torch.randn(2, 6, 64)
    assert len(client.route(0, 4)) == 2
    assert rel_err(client.forward(hidden, 0, 4), hf_blocks(micro_hf, hidden, 0, 4)) <= TOL
    grad, _ = client.backward(hidden, grad_out, 0, 4)
    leaf = hidden.clone().requires_grad_(True)
    with torch.enable_grad():
        hf_blocks(micro_hf, leaf, 0, 4).backward(grad_out)
    assert rel_err(grad, leaf.grad) <= TOL


def test_inference_through_a_chain_of_nodes(client, micro_hf):
    torch.manual_seed(12)
    hidden = torch.randn(1, 7, 64)
    with client.session(max_length=7, start=0, end=4) as session:
        assert len(session.session.sessions) == 2
        outs = [session.step(hidden[:, :3])] + [session.step(hidden[:, t : t + 1]) for t in range(3, 7)]
    assert rel_err(torch.cat(outs, 1), hf_blocks(micro_hf, hidden, 0, 4)) <= TOL


def test_records_are_refreshed_with_later_expirations(client, swarm):
    first, _ = swarm
    uid = "micro-llama.0"

    def expiration():
        found = client.run(client.swarm.dht.get(uid, latest=True))
        return found.value[first.peer_id].expiration_time

    before = expiration()
    deadline = time.monotonic() + 15
    while expiration() <= before:  # --update_period 2 on the first node
        assert time.monotonic() < deadline, "the record was not refreshed"
        time.sleep(0.5)


def test_push_chain_of_v220_clients(client, swarm, micro_hf):
    """A v2.2.0 client names the next server in `next_servers`: the first node pushes its output there,
    the second answers on its own stream, and the client's own copy of that step is dropped (step_id)."""
    first, second = swarm
    torch.manual_seed(13)
    hidden = torch.randn(1, 4, 64)
    ref = hf_blocks(micro_hf, hidden, 0, 4)

    async def scenario():
        swarm_client = client.swarm
        p2p = swarm_client.p2p
        sid_a, sid_b = str(uuid.uuid4()), str(uuid.uuid4())
        queues = {"a": asyncio.Queue(), "b": asyncio.Queue()}

        async def feed(q):
            while (item := await q.get()) is not None:
                yield item

        name = "TransformerConnectionHandler.rpc_inference"
        a = await p2p.iterate_protobuf_handler(
            PeerID.from_base58(first.peer_id), name, feed(queues["a"]), runtime_pb2.ExpertResponse
        )
        b = await p2p.iterate_protobuf_handler(
            PeerID.from_base58(second.peer_id), name, feed(queues["b"]), runtime_pb2.ExpertResponse
        )

        def request(uid_range, session_id, step_id, x, first_step, next_servers=None):
            metadata = {"session_id": session_id, "step_id": step_id, "args_structure": ARGS_3}
            if first_step:
                metadata.update(max_length=4, points=0.0, active_adapter=None)
            if next_servers:
                metadata["next_servers"] = next_servers
            tensors = [x, torch.empty(0), torch.empty(0, dtype=torch.int64)]
            return _request(swarm_client.uid(*uid_range), tensors, metadata)

        # step 1: the prefill goes to both servers from the client (no push yet)
        step = str(uuid.uuid4())
        queues["a"].put_nowait(request((0, 2), sid_a, step, hidden[:, :3], True))
        mid = _decode((await a.__anext__()).tensors[0])
        queues["b"].put_nowait(request((2, 4), sid_b, step, mid, True))
        out1 = _decode((await b.__anext__()).tensors[0])
        # step 2: the first server pushes to the second, which answers the client on its own stream
        step = str(uuid.uuid4())
        queues["a"].put_nowait(request((0, 2), sid_a, step, hidden[:, 3:4], False, [(second.peer_id, sid_b, 2, 4)]))
        mid2 = _decode((await a.__anext__()).tensors[0])
        out2 = _decode((await asyncio.wait_for(b.__anext__(), 30)).tensors[0])
        # the client's own copy of step 2 arrives late and is dropped: the next answer is step 3's
        queues["b"].put_nowait(request((2, 4), sid_b, step, mid2, False))
        queues["b"].put_nowait(request((2, 4), sid_b, str(uuid.uuid4()), torch.zeros(1, 0, 64), False))
        out3 = _decode((await asyncio.wait_for(b.__anext__(), 30)).tensors[0])
        for q in queues.values():
            q.put_nowait(runtime_pb2.ExpertRequest())
            q.put_nowait(None)
        for stream in (a, b):
            async for _ in stream:
                pass
        return out1, out2, out3

    out1, out2, out3 = client.run(scenario(), timeout=60)
    assert rel_err(torch.cat([out1, out2], 1), ref) <= TOL
    assert out3.shape == (1, 0, 64)


def test_bfloat16_node_matches_transformers_in_bfloat16(tmp_path, micro_hf):
    torch.manual_seed(14)
    hidden = torch.randn(1, 5, 64)
    with NodeProcess(MICRO_LLAMA, tmp_path / "bf16", "--torch_dtype", "bfloat16", dht_prefix="micro-bf16") as node:
        with Client(node.maddrs, "micro-bf16") as client:
            assert client.spans(4)[0].info.torch_dtype == "bfloat16"
            out = client.forward(hidden, 0, 4)
    # a copy: .to() is in place, and a float32 -> bfloat16 -> float32 round trip would spoil the
    # shared model for every later test
    reference = hf_blocks(copy.deepcopy(micro_hf).to(torch.bfloat16), hidden.to(torch.bfloat16), 0, 4)
    assert rel_err(out, reference) <= 1e-2


def test_sharded_checkpoint_is_served(tmp_path):
    from transformers import AutoModelForCausalLM

    from node.tools.tinymodel import make_tiny_llama

    path = tmp_path / "sharded"
    make_tiny_llama(str(path), hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=128, shards=3)
    assert (path / "model.safetensors.index.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    hidden = torch.randn(1, 4, 64)
    with NodeProcess(path, tmp_path / "run", "--block_indices", "1:3", dht_prefix="sharded") as node:
        with Client(node.maddrs, "sharded") as client:
            out = client.forward(hidden, 1, 3)
    assert rel_err(out, hf_blocks(hf, hidden, 1, 3)) <= TOL


def test_next_pings_name_the_following_server(client, swarm):
    """The first node pings the server of the block after its span and publishes the round trip."""
    first, second = swarm
    deadline = time.monotonic() + 30
    while True:
        info = client.servers(4)[0].get(first.peer_id)
        pings = info.next_pings if info else None
        if pings and second.peer_id in pings:
            break
        assert time.monotonic() < deadline, f"no ping of the second node published: {pings}"
        time.sleep(0.5)
    assert isinstance(pings[second.peer_id], float) and 0 < pings[second.peer_id] < 5
    assert first.peer_id not in pings
    last = client.servers(4)[2].get(second.peer_id)
    assert last.next_pings == {}  # nothing follows the last block


def test_a_node_nobody_can_dial_announces_using_relay(tmp_path, client, swarm):
    """A node that announces an address nobody listens on fails the rpc_check of its peers: it
    publishes using_relay (and runs its DHT in client mode); the nodes that can be dialed do not."""
    first, second = swarm
    hidden = NodeProcess(
        MICRO_LLAMA,
        tmp_path / "hidden",
        "--block_indices",
        "0:1",
        "--initial_peers",
        *first.maddrs,
        "--announce_maddrs",
        "/ip4/127.0.0.1/tcp/9",
        dht_prefix="micro-llama",
    )
    with hidden:
        deadline = time.monotonic() + 30
        while (info := client.servers(4)[0].get(hidden.peer_id)) is None:
            assert time.monotonic() < deadline, "the hidden node's record never appeared"
            time.sleep(0.5)
        assert info.using_relay is True
        assert client.servers(4)[0][first.peer_id].using_relay is False
        assert client.servers(4)[2][second.peer_id].using_relay is False
