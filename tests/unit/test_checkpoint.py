"""Checkpoint: reading one block's tensors from local and Hub safetensors checkpoints (PROTOCOL 5.11)."""

import json
import os
import shutil

import huggingface_hub
import pytest
import safetensors
import safetensors.torch
import torch
from huggingface_hub.errors import EntryNotFoundError

from node.tools.tinymodel import make_tiny_llama
from node.weights.checkpoint import Checkpoint

SIZE = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=128, seed=7)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("single")), **SIZE)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("sharded")), shards=4, **SIZE)


def weight_map(path):
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"]


def block_files(path, index):
    return {f for name, f in weight_map(path).items() if name.startswith(f"model.layers.{index}.")}


def record_opens(monkeypatch):
    opened = []
    real = safetensors.safe_open

    def spy(path, *args, **kwargs):
        opened.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    return opened


def test_sharded_checkpoint_layout(sharded):
    assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
    assert len(set(weight_map(sharded).values())) >= 4


def test_single_and_sharded_give_identical_blocks(single, sharded):
    for index in range(SIZE["num_layers"]):
        a = Checkpoint.open(single).block_state(f"model.layers.{index}.", dtype=torch.float32)
        b = Checkpoint.open(sharded).block_state(f"model.layers.{index}.", dtype=torch.float32)
        assert "self_attn.q_proj.weight" in a and "input_layernorm.weight" in a
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_read_opens_only_needed_shards(sharded, monkeypatch):
    checkpoint = Checkpoint.open(sharded)
    needed = block_files(sharded, 2)
    assert needed != set(weight_map(sharded).values())  # otherwise the test proves nothing
    opened = record_opens(monkeypatch)
    state = checkpoint.block_state("model.layers.2.", dtype=torch.float32)
    assert set(opened) == needed and len(opened) == len(needed)  # each file opened once
    assert len(state) == 9


def test_dtype_cast_on_load(single):
    state = Checkpoint.open(single).block_state("model.layers.0.", dtype=torch.bfloat16)
    reference = Checkpoint.open(single).block_state("model.layers.0.", dtype=torch.float32)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert torch.equal(state["mlp.up_proj.weight"], reference["mlp.up_proj.weight"].to(torch.bfloat16))


def test_integer_tensors_keep_their_dtype(tmp_path, single):
    shutil.copy(os.path.join(single, "config.json"), tmp_path)
    tensors = safetensors.torch.load_file(os.path.join(single, "model.safetensors"))
    tensors["model.layers.0.counter"] = torch.arange(5, dtype=torch.int32)
    safetensors.torch.save_file(tensors, str(tmp_path / "model.safetensors"))
    state = Checkpoint.open(str(tmp_path)).block_state("model.layers.0.", dtype=torch.bfloat16)
    assert state["counter"].dtype == torch.int32 and state["counter"].tolist() == [0, 1, 2, 3, 4]


def test_missing_block_prefix_is_a_clear_error(single):
    with pytest.raises(ValueError, match=r"model\.layers\.99\."):
        Checkpoint.open(single).block_state("model.layers.99.", dtype=torch.float32)


def test_checkpoint_without_causal_lm_prefix(tmp_path, single):
    shutil.copy(os.path.join(single, "config.json"), tmp_path)
    tensors = safetensors.torch.load_file(os.path.join(single, "model.safetensors"))
    bare = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    safetensors.torch.save_file(bare, str(tmp_path / "model.safetensors"))
    state = Checkpoint.open(str(tmp_path)).block_state("model.layers.1.", dtype=torch.float32)
    reference = Checkpoint.open(single).block_state("model.layers.1.", dtype=torch.float32)
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    found = Checkpoint.open(str(tmp_path)).tensors(["model.norm.weight", "lm_head.weight"], dtype=torch.float32)
    assert list(found) == ["model.norm.weight"]


def test_named_tensors(sharded, single):
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.not_there"]
    found = Checkpoint.open(sharded).tensors(names, dtype=torch.bfloat16)
    assert set(found) == set(names[:3])
    assert found["model.embed_tokens.weight"].shape == (128, 64)
    assert found["lm_head.weight"].dtype == torch.bfloat16
    reference = Checkpoint.open(single).tensors(names, dtype=torch.bfloat16)
    assert all(torch.equal(found[k], reference[k]) for k in found)


def test_config_and_local_attributes(single):
    checkpoint = Checkpoint.open(single)
    assert checkpoint.is_local and checkpoint.repository is None and checkpoint.name == single
    config = checkpoint.config()
    assert config.model_type == "llama" and config.num_hidden_layers == 4


def test_pytorch_bin_only_is_rejected(tmp_path, single):
    shutil.copy(os.path.join(single, "config.json"), tmp_path)
    torch.save({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Checkpoint.open(str(tmp_path)).block_state("model.layers.0.", dtype=torch.float32)


def fake_hub(monkeypatch, files_dir, requests):
    """Serves a local directory as if it were a Hub repo; records (repo_id, filename) of each request."""

    def download(repo_id, filename, *, revision=None, token=None, cache_dir=None, local_files_only=False, **kwargs):
        # a look into the local cache sends nothing, so it carries no token (False): only real requests do
        requests.append((repo_id, filename, revision, False if local_files_only else token))
        path = os.path.join(files_dir, filename)
        if not os.path.exists(path):
            raise EntryNotFoundError(f"404: {filename}")
        return path

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)


def test_hub_sharded_downloads_only_needed_shards(sharded, monkeypatch, tmp_path):
    requests = []
    fake_hub(monkeypatch, sharded, requests)
    checkpoint = Checkpoint.open("someone/tiny-llama", revision="abc", token="tok", cache_dir=str(tmp_path))
    assert not checkpoint.is_local and checkpoint.repository == "https://huggingface.co/someone/tiny-llama"
    assert checkpoint.config().hidden_size == 64
    requests.clear()
    state = checkpoint.block_state("model.layers.3.", dtype=torch.float32)
    assert len(state) == 9
    fetched = [filename for _, filename, _, _ in requests]
    assert set(fetched) == {"model.safetensors.index.json"} | block_files(sharded, 3)
    assert all(r[0] == "someone/tiny-llama" and r[2] == "abc" and r[3] in ("tok", False) for r in requests)


def test_hub_single_file_and_legacy_alias(single, monkeypatch, tmp_path):
    requests = []
    fake_hub(monkeypatch, single, requests)
    checkpoint = Checkpoint.open("bigscience/tiny-petals", cache_dir=str(tmp_path))
    assert checkpoint.name == "bigscience/tiny-petals"
    assert checkpoint.repository == "https://huggingface.co/bigscience/tiny"
    state = checkpoint.block_state("model.layers.0.", dtype=torch.float32)
    reference = Checkpoint.open(single).block_state("model.layers.0.", dtype=torch.float32)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    # The index is tried first (404 here), then the single file.
    assert [f for _, f, _, _ in requests][:2] == ["model.safetensors.index.json", "model.safetensors"]
    assert {r[0] for r in requests} == {"bigscience/tiny"}


def test_hub_without_safetensors_is_rejected(tmp_path, monkeypatch):
    fake_hub(monkeypatch, str(tmp_path), [])
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Checkpoint.open("someone/old-model", cache_dir=str(tmp_path)).block_state(
            "model.layers.0.", dtype=torch.float32
        )
