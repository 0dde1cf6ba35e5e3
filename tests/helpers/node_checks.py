"""What a Petals client gets from a node serving micro-llama equals plain transformers: the checks that
tests/integration/test_node.py runs against a one-device node and test_tensor_parallel_node.py against
a two-rank one (each takes the fixtures micro_client and micro_hf of its module)."""

from __future__ import annotations

import torch

from tests.helpers.paths import MICRO_LLAMA
from tests.helpers.reference import hf_blocks, rel_err

TOL = 1e-5


def check_forward_equals_transformers(micro_client, micro_hf):
    torch.manual_seed(1)
    hidden = torch.randn(2, 7, 64)
    for start, end in [(0, 4), (1, 3), (3, 4)]:
        out = micro_client.forward(hidden, start, end)
        assert rel_err(out, hf_blocks(micro_hf, hidden, start, end)) <= TOL


def check_forward_with_deep_prompts(micro_client, micro_hf):
    torch.manual_seed(2)
    hidden, prompts = torch.randn(2, 6, 64), torch.randn(4, 1, 3, 64)
    out = micro_client.forward(hidden, 0, 4, prompts=prompts)
    assert rel_err(out, hf_blocks(micro_hf, hidden, 0, 4, prompts=prompts)) <= TOL


def check_backward_equals_transformers(micro_client, micro_hf):
    torch.manual_seed(3)
    hidden = torch.randn(2, 5, 64)
    prompts = torch.randn(4, 2, 2, 64)
    grad_out = torch.randn(2, 5, 64)
    grad, grad_prompts = micro_client.backward(hidden, grad_out, 0, 4, prompts=prompts)

    ref_in = hidden.clone().requires_grad_(True)
    ref_prompts = prompts.clone().requires_grad_(True)
    with torch.enable_grad():
        out = hf_blocks(micro_hf, ref_in, 0, 4, prompts=ref_prompts)
        out.backward(grad_out)
    assert rel_err(grad, ref_in.grad) <= TOL
    assert rel_err(grad_prompts, ref_prompts.grad) <= TOL


def check_large_forward_uses_stream_and_matches(micro_client, micro_hf):
    torch.manual_seed(4)
    hidden = torch.randn(1, 4200, 64)  # 1.07 MB: the client switches to rpc_forward_stream
    out = micro_client.forward(hidden, 0, 4)
    assert rel_err(out, hf_blocks(micro_hf, hidden, 0, 4)) <= TOL


def check_inference_equals_full_forward(micro_client, micro_hf):
    torch.manual_seed(5)
    hidden = torch.randn(1, 9, 64)
    ref = hf_blocks(micro_hf, hidden, 0, 4)
    with micro_client.session(max_length=9, start=0, end=4) as session:
        outs = [session.step(hidden[:, :4])]
        for t in range(4, 9):
            outs.append(session.step(hidden[:, t : t + 1]))
        assert session.position == 9
    assert rel_err(torch.cat(outs, dim=1), ref) <= TOL


def check_inference_rollback(micro_client, micro_hf):
    torch.manual_seed(6)
    hidden = torch.randn(1, 8, 64)
    other = torch.randn(1, 3, 64)
    with micro_client.session(max_length=8, start=0, end=4) as session:
        session.step(hidden[:, :5])
        session.step(other)  # speculative tokens, then rolled back
        out = session.step(hidden[:, 5:8], start_from_position=5)
    assert rel_err(out, hf_blocks(micro_hf, hidden, 0, 4)[:, 5:8]) <= TOL


def check_inference_hypo_ids_reorder_cache(micro_client, micro_hf):
    torch.manual_seed(7)
    a, b = torch.randn(1, 4, 64), torch.randn(1, 4, 64)
    nxt = torch.randn(2, 1, 64)
    with micro_client.session(max_length=5, start=0, end=4) as session:
        session.step(torch.cat([a, b]))
        out = session.step(nxt, hypo_ids=torch.tensor([1, 1]))
    ref = hf_blocks(micro_hf, torch.cat([torch.cat([b, nxt[:1]], 1), torch.cat([b, nxt[1:]], 1)]), 0, 4)[:, -1:]
    assert rel_err(out, ref) <= TOL


def check_greedy_generation_equals_transformers(micro_client, micro_hf):
    from node.client.generate import LocalHead, greedy_generate

    head = LocalHead(str(MICRO_LLAMA))
    ids = torch.tensor([[1, 17, 42, 99, 3]])
    ours = greedy_generate(micro_client, head, ids, max_new_tokens=12)
    ref = micro_hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0
    )
    assert ours.tolist() == ref.tolist()


def check_inference_with_deep_prompts(micro_client, micro_hf):
    torch.manual_seed(8)
    hidden, prompts = torch.randn(1, 6, 64), torch.randn(4, 1, 3, 64)
    ref = hf_blocks(micro_hf, hidden, 0, 4, prompts=prompts)
    with micro_client.session(max_length=6, start=0, end=4) as session:
        first = session.step(hidden[:, :4], prompts=prompts)  # the prompts sit at the first positions
        rest = [session.step(hidden[:, t : t + 1]) for t in range(4, 6)]
    assert rel_err(torch.cat([first] + rest, 1), ref) <= TOL
