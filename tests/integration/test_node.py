"""A whole node serving micro-llama: what a Petals client gets equals plain transformers."""

from __future__ import annotations

from tests.helpers import node_checks

# what a client gets equals transformers (the same checks run against a tensor-parallel node)
test_forward_equals_transformers = node_checks.check_forward_equals_transformers
test_forward_with_deep_prompts = node_checks.check_forward_with_deep_prompts
test_backward_equals_transformers = node_checks.check_backward_equals_transformers
test_large_forward_uses_stream_and_matches = node_checks.check_large_forward_uses_stream_and_matches
test_inference_equals_full_forward = node_checks.check_inference_equals_full_forward
test_inference_rollback = node_checks.check_inference_rollback
test_inference_hypo_ids_reorder_cache = node_checks.check_inference_hypo_ids_reorder_cache
test_greedy_generation_equals_transformers = node_checks.check_greedy_generation_equals_transformers
test_inference_with_deep_prompts = node_checks.check_inference_with_deep_prompts


def test_announces_online_span_with_strict_types(micro_client, micro_node):
    spans = micro_client.spans(4)
    assert [(s.peer_id, s.start, s.end) for s in spans] == [(micro_node.peer_id, 0, 4)]
    info = spans[0].info
    assert isinstance(info.throughput, float) and info.torch_dtype == "float32" and info.quant_type == "none"
    assert info.cache_tokens_left == 131072  # 2 * 64 * 16384 // 2 * 4 bytes * 4 blocks // (64 * 4 // 2)


def test_model_record(micro_client):
    from protocol.dht_records import MODELS_KEY, read_model_record

    found = micro_client.run(micro_client.swarm.dht.get(MODELS_KEY, latest=True))
    assert found is not None
    assert read_model_record(found.value["micro-llama"].value) == (4, None)


def test_rpc_info(micro_client, micro_node):
    info = micro_client.rpc_info(micro_node.peer_id, "micro-llama.0")
    assert info["cache_tokens_available"] == 65536
    assert info["keyword_names"] == ()
    assert len(info["outputs_schema"]) == 1


def test_frontends_answer_rpc_info_without_torch(micro_client, micro_node):
    """Nothing on a request path imports: a frontend answers rpc_info naming a block (the schemas included)
    without loading torch, which took a second on each frontend's first call."""
    for _ in range(4):  # p2pd spreads the calls over both frontends
        micro_client.rpc_info(micro_node.peer_id, "micro-llama.0")
    for name in ("frontend.0", "frontend.1"):
        maps = open(f"/proc/{micro_node.actor_pid(name)}/maps").read()
        assert "libtorch" not in maps, f"{name} loaded torch"


def test_logs_are_json_lines_with_the_actor(micro_node):
    import json

    actors = set()
    for line in micro_node.log_path.read_text().splitlines():
        event = json.loads(line)  # one event per line, JSON when not on a terminal
        assert {"event", "level", "timestamp", "actor", "pid"} <= set(event)
        actors.add(event["actor"].split(".")[0])
    assert {"supervisor", "announcer", "allocator", "runtime", "frontend"} <= actors
