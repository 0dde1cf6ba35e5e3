"""Batching across sessions in a node: the same numbers as one request at a time, and the runtime really
batches (rounds counted through the probe)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import torch

from tests.helpers.paths import ROOT
from tests.helpers.reference import hf_blocks, rel_err

TOL = 1e-5


def runtime_rounds(run_dir) -> int:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.probe",
            str(run_dir),
            "--actor",
            "runtime",
            "--type",
            "Stats",
            "--json",
            "--count",
            "1",
            "--duration",
            "20",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return json.loads(out.splitlines()[-1])["fields"]["rounds"]


def test_concurrent_sessions_are_batched_and_exact(micro_client, micro_node, micro_hf):
    torch.manual_seed(21)
    sessions, steps = 6, 8
    inputs = [torch.randn(1, 3 + steps, 64) for _ in range(sessions)]
    refs = [hf_blocks(micro_hf, x, 0, 4) for x in inputs]
    swarm = micro_client.swarm

    async def one(x):
        async with swarm.inference_session(max_length=x.shape[1], start=0, end=4) as session:
            outs = [await session.step(x[:, :3])]
            for t in range(3, x.shape[1]):
                outs.append(await session.step(x[:, t : t + 1]))
        return torch.cat(outs, 1)

    async def all_sessions():
        return await asyncio.gather(*(one(x) for x in inputs))

    before = runtime_rounds(micro_node.run_dir)
    outputs = micro_client.run(all_sessions())
    rounds = runtime_rounds(micro_node.run_dir) - before
    for out, ref in zip(outputs, refs):
        assert rel_err(out, ref) <= TOL
    # one at a time would take sessions * (steps + 1) rounds; together they share rounds
    assert rounds < sessions * (steps + 1)


def test_long_prefill_goes_in_chunks_beside_other_sessions(micro_client, micro_hf):
    torch.manual_seed(22)
    long_input, short_input = torch.randn(2, 700, 64), torch.randn(1, 6, 64)  # 2 x 700 tokens: several chunks
    swarm = micro_client.swarm

    async def long_session():
        async with swarm.inference_session(max_length=701, start=0, end=4) as session:
            return await session.step(long_input)

    async def short_session():
        async with swarm.inference_session(max_length=6, start=1, end=3) as session:
            outs = [await session.step(short_input[:, t : t + 1]) for t in range(6)]
        return torch.cat(outs, 1)

    async def both():
        return await asyncio.gather(long_session(), short_session())

    long_out, short_out = micro_client.run(both())
    assert rel_err(long_out, hf_blocks(micro_hf, long_input, 0, 4)) <= TOL
    assert rel_err(short_out, hf_blocks(micro_hf, short_input, 1, 3)) <= TOL


def test_concurrent_forwards_are_merged_and_exact(micro_client, micro_hf):
    torch.manual_seed(23)
    inputs = [torch.randn(b, t, 64) for b, t in [(1, 5), (2, 17), (3, 2), (1, 40)]]
    spans = [(0, 4), (1, 3), (0, 2), (2, 4)]
    swarm = micro_client.swarm

    async def all_forwards():
        return await asyncio.gather(*(swarm.forward(x, s, e) for x, (s, e) in zip(inputs, spans)))

    for out, x, (s, e) in zip(micro_client.run(all_forwards()), inputs, spans):
        assert rel_err(out, hf_blocks(micro_hf, x, s, e)) <= TOL


def test_a_largest_forward_goes_block_by_block_beside_inference(micro_node, micro_client, micro_hf):
    """A forward of --max_batch_size tokens goes through its blocks one per round (a round is at most
    max_batch_size tokens x blocks), so a session's steps are answered in between; both stay exact."""
    torch.manual_seed(24)
    big, small = torch.randn(1, 8192, 64), torch.randn(1, 4, 64)
    swarm = micro_client.swarm
    before = runtime_rounds(micro_node.run_dir)

    async def session():
        async with swarm.inference_session(max_length=4, start=0, end=4) as s:
            return torch.cat([await s.step(small[:, t : t + 1]) for t in range(4)], 1)

    async def both():
        return await asyncio.gather(swarm.forward(big, 0, 4), session())

    big_out, small_out = micro_client.run(both(), timeout=120)
    assert rel_err(big_out, hf_blocks(micro_hf, big, 0, 4)) <= TOL
    assert rel_err(small_out, hf_blocks(micro_hf, small, 0, 4)) <= TOL
    assert runtime_rounds(micro_node.run_dir) - before >= 4 + 4  # 4 one-block rounds of the forward, 4 steps
