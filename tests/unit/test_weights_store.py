"""Weights from the hub (PROTOCOL 5.11), with the real huggingface_hub code against a local HTTP server
that speaks the part of the hub's API that downloads use, serving repositories made here.

The server answers HEAD/GET /{repo}/resolve/{revision}/{file} as huggingface.co does: small files
directly (ETag = git blob sha1), safetensors files (LFS) with a 302 to a "CDN" path and their sha256 in
X-Linked-Etag / X-Linked-Size; errors carry X-Error-Code as the hub's do. It records every request, and
can cut a download short, slow it down, or hold it half-way.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError

from node.weights.checkpoint import Checkpoint
from node.weights.store import DownloadFailed, HubAccessError, NotEnoughDiskSpace, WeightStore
from tests.helpers.fake_hub import INDEX, all_shards, cache, same_block, shards_of
from tests.helpers.paths import ROOT

# --- a local hub ------------------------------------------------------------------------------


# --- fixtures ---------------------------------------------------------------------------------


# --- downloads --------------------------------------------------------------------------------


def test_single_file_repository(hub, models, tmp_path):
    checkpoint = Checkpoint.open("org/single", weight_store=cache(tmp_path, hub))
    assert checkpoint.config().num_hidden_layers == 6
    assert same_block(checkpoint, models["single"], 2)
    assert hub.gets() == {"config.json": 1, "model.safetensors": 1}
    # the index is looked for first (PROTOCOL 5.11), answered 404 once, not retried
    assert [e["method"] for e in hub.log if e["file"] == INDEX] == ["HEAD"]


def test_sharded_repository_downloads_only_the_needed_shards(hub, models, tmp_path):
    checkpoint = Checkpoint.open("org/sharded", weight_store=cache(tmp_path, hub))
    checkpoint.config()
    for index in (1, 2):
        assert same_block(checkpoint, models["sharded"], index)
    needed = shards_of(models["sharded"], [1, 2])
    assert needed != all_shards(models["sharded"])  # otherwise the test proves nothing
    assert hub.gets() == Counter({"config.json": 1, INDEX: 1, **{f: 1 for f in needed}})
    assert not (hub.files_touched() & (all_shards(models["sharded"]) - needed))  # not even a HEAD


def test_revision_and_token(hub, models, tmp_path):
    hub.add("org/private", models["sharded"])
    hub.add("org/private", models["other"], revision="v2")
    hub.token = "secret"
    checkpoint = Checkpoint.open("org/private", revision="v2", token="secret", weight_store=cache(tmp_path, hub))
    assert same_block(checkpoint, models["other"], 3)
    resolves = [e for e in hub.log if e["path"].startswith("/org/private/resolve/")]
    assert resolves and all(e["revision"] == "v2" and e["auth"] == "Bearer secret" for e in resolves)

    for token, words in [("wrong", "--token"), (None, "--token")]:
        hub.log.clear()
        with pytest.raises(HubAccessError, match=words):
            Checkpoint.open("org/private", token=token, weight_store=cache(tmp_path / str(token), hub)).config()
        assert len(hub.log) == 1  # refused: not retried
    hub.token = None
    hub.log.clear()
    with pytest.raises(HubAccessError, match="--revision"):
        Checkpoint.open("org/private", revision="v3", weight_store=cache(tmp_path / "v3", hub)).config()
    assert len(hub.log) == 1


def test_use_auth_token_sends_the_token_huggingface_cli_login_saved(hub, models, tmp_path, monkeypatch):
    """token=True (--use_auth_token, as in Petals) is the token `huggingface-cli login` saved; with none saved
    the error says how to save one, and nothing is retried."""
    from huggingface_hub import constants

    hub.add("org/private", models["sharded"])
    hub.token = "saved-secret"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    (tmp_path / "token").write_text("saved-secret")
    assert Checkpoint.open("org/private", token=True, weight_store=cache(tmp_path / "a", hub)).config()
    assert all(e["auth"] == "Bearer saved-secret" for e in hub.log if e["path"].startswith("/org/private/"))
    (tmp_path / "token").unlink()
    hub.log.clear()
    with pytest.raises(HubAccessError, match="huggingface-cli login"):
        Checkpoint.open("org/private", token=True, weight_store=cache(tmp_path / "b", hub)).config()
    assert len(hub.log) <= 1


def test_missing_file_or_repository_is_a_clear_error_without_retries(hub, tmp_path):
    weights = cache(tmp_path, hub)
    with pytest.raises(EntryNotFoundError):
        weights.fetch("org/single", "no-such-file.json")
    with pytest.raises(HubAccessError, match="no such repository"):
        weights.fetch("org/nothing", "config.json")
    assert len(hub.log) == 2
    (tmp_path / "bin-only").mkdir()
    (tmp_path / "bin-only" / "pytorch_model.bin").write_bytes(b"0")
    hub.add("org/bin-only", tmp_path / "bin-only")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Checkpoint.open("org/bin-only", weight_store=weights).weight_map()


def test_interrupted_download_resumes(hub, models, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub writes what it received in chunks of 10 MB; these files are smaller
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    hub.cut["model.safetensors"] = 1  # the first GET ends after half of the file
    checkpoint = Checkpoint.open("org/single", weight_store=cache(tmp_path, hub))
    assert same_block(checkpoint, models["single"], 0)
    gets = [e for e in hub.log if e["file"] == "model.safetensors" and e["method"] == "GET" and e["body"]]
    size = (models["single"] / "model.safetensors").stat().st_size
    assert len(gets) == 2 and gets[0]["range"] is None
    resumed_at = int(gets[1]["range"][len("bytes=") : -1])
    assert 0 < resumed_at <= size // 2  # resumed from what was received, not started over


def test_network_failures_are_retried_with_backoff_then_given_up(hub, tmp_path):
    hub.cut["model.safetensors"] = 100
    hub.cut_fraction = 0.0
    weights = cache(tmp_path, hub, attempts=3)
    began = time.monotonic()
    with pytest.raises(DownloadFailed, match="3 attempts"):
        weights.fetch("org/single", "model.safetensors")
    assert time.monotonic() - began >= 0.05 + 0.1  # backoff doubles
    assert hub.gets()["model.safetensors"] == 3


def test_progress_bars_only_on_a_terminal(hub, tmp_path):
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    enable_progress_bars()
    try:
        WeightStore(str(tmp_path / "c"), endpoint=hub.url).fetch("org/single", "config.json")  # pytest: not a TTY
        assert are_progress_bars_disabled("huggingface_hub.http_get")
    finally:
        enable_progress_bars()


# --- the shared cache -------------------------------------------------------------------------


def test_cached_files_need_no_network(hub, models, tmp_path):
    first = Checkpoint.open("org/sharded", weight_store=cache(tmp_path, hub))
    first.config()
    assert same_block(first, models["sharded"], 4)
    hub.log.clear()
    again = Checkpoint.open("org/sharded", weight_store=cache(tmp_path, hub))  # as another node would
    again.config()
    assert same_block(again, models["sharded"], 4)
    assert hub.log == []


def test_eviction_in_least_recently_used_order(hub, models, tmp_path):
    shard_a, shard_b, shard_c = sorted(all_shards(models["sharded"]))[:3]
    sizes = {f: (models["sharded"] / f).stat().st_size for f in (shard_a, shard_b, shard_c, "config.json", INDEX)}
    small = sizes["config.json"] + sizes[INDEX]
    limit = small + max(sizes[shard_a] + sizes[shard_c], sizes[shard_b] + sizes[shard_c]) + 1000
    assert limit < small + sizes[shard_a] + sizes[shard_b] + sizes[shard_c]  # all three cannot stay
    weights = cache(tmp_path, hub, max_disk_space=limit)
    paths = {f: weights.fetch("org/sharded", f) for f in ("config.json", INDEX, shard_b, shard_a)}
    time.sleep(0.01)
    for f in ("config.json", INDEX):  # used again: now more recent than either shard
        assert weights.fetch("org/sharded", f) == paths[f]
    hub.log.clear()
    paths[shard_c] = weights.fetch("org/sharded", shard_c)

    assert hub.gets() == {shard_c: 1}
    blob_b = os.path.realpath(paths[shard_b])
    assert not os.path.lexists(paths[shard_b]) and not os.path.exists(blob_b)  # link and blob gone
    assert all(os.path.exists(paths[f]) for f in ("config.json", INDEX, shard_a, shard_c))
    assert weights.size() <= limit
    assert weights.cached("org/sharded", shard_b) is None

    # a file that cannot fit even in an empty cache: a clear error, and nothing deleted
    tight = cache(tmp_path, hub, max_disk_space=sizes[shard_b] - 1)
    hub.log.clear()
    with pytest.raises(NotEnoughDiskSpace, match="max_disk_space"):
        tight.fetch("org/sharded", shard_b)
    assert all(os.path.exists(paths[f]) for f in ("config.json", INDEX, shard_a, shard_c))
    assert not hub.gets()


def test_free_disk_space_is_kept(hub, monkeypatch, tmp_path):
    import shutil

    from node.weights import store as weight_store

    weights = cache(tmp_path, hub)  # no max_disk_space: only the disk's free space counts
    config = weights.fetch("org/single", "config.json")
    size = os.path.getsize(config)
    real = shutil.disk_usage(weights.cache_dir)
    room = 1000  # the disk pretends to have this much beyond the 1 GiB reserve, plus what eviction frees

    def usage(path):
        return real._replace(free=weights.reserve + room + (0 if os.path.exists(config) else size))

    monkeypatch.setattr(weight_store.shutil, "disk_usage", usage)
    with pytest.raises(NotEnoughDiskSpace, match="free disk"):  # too big even with the config gone
        weights.fetch("org/single", "model.safetensors")
    assert os.path.exists(config)
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "notes.json").write_bytes(b"x" * (room + size - 10))
    hub.add("org/notes", tmp_path / "repo")
    weights.fetch("org/notes", "notes.json")  # fits once the config is evicted
    assert not os.path.exists(config)


def test_download_holds_the_exclusive_lock_and_waits_for_readers(hub, tmp_path):
    weights = cache(tmp_path, hub)
    weights.fetch("org/sharded", "config.json")
    lock = os.open(weights.lock_path, os.O_RDWR)
    try:
        # 1. while a file downloads, nobody may read the cache
        hub.hold["model-00002-of-00004.safetensors"] = threading.Event()
        done = []
        worker = threading.Thread(
            target=lambda: done.append(weights.fetch("org/sharded", "model-00002-of-00004.safetensors"))
        )
        worker.start()
        assert hub.holding.wait(10)
        with pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        hub.hold["model-00002-of-00004.safetensors"].set()
        worker.join(10)
        assert done
        # 2. while another process reads, a download waits
        fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        worker = threading.Thread(
            target=lambda: done.append(weights.fetch("org/sharded", "model-00003-of-00004.safetensors"))
        )
        worker.start()
        time.sleep(0.5)
        assert len(done) == 1 and not hub.gets()["model-00003-of-00004.safetensors"]
        fcntl.flock(lock, fcntl.LOCK_UN)
        worker.join(10)
        assert len(done) == 2
    finally:
        os.close(lock)


LOADER = """
import json, logging, sys, torch
logging.basicConfig(level=logging.INFO)  # to stderr
from node.weights.checkpoint import Checkpoint
repo, cache_dir, *blocks = sys.argv[1:]
checkpoint = Checkpoint.open(repo, cache_dir=cache_dir)
checkpoint.config()
sums = {}
for b in blocks:
    state = checkpoint.block_state(f"model.layers.{b}.", dtype=torch.float32)
    sums[b] = {k: float(v.double().sum()) for k, v in sorted(state.items())}
print(json.dumps(sums))
"""


def waiting_for_flock(path: str) -> bool:
    """Whether some process waits for a flock on this file (/proc/locks marks waiters with "->")."""
    inode = os.stat(path).st_ino
    with open("/proc/locks") as f:
        return any("->" in line and line.split()[-3].endswith(f":{inode}") for line in f)


def test_two_processes_share_the_cache(hub, models, tmp_path):
    hub.hold["config.json"] = threading.Event()  # the first download stops half-way, under the lock
    env = {**os.environ, "HF_ENDPOINT": hub.url, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    cache_dir = str(tmp_path / "shared-cache")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOADER, "org/sharded", cache_dir, *blocks],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for blocks in (["1", "2"], ["2", "3"])
    ]
    try:
        assert hub.holding.wait(60)
        deadline = time.monotonic() + 30
        while not waiting_for_flock(os.path.join(cache_dir, "blocks.lock")) and time.monotonic() < deadline:
            time.sleep(0.05)  # until the other process waits for the lock
        hub.hold["config.json"].set()
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert any("waiting for the weight cache lock" in err for _, err in outputs)
    results = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    reference = Checkpoint.open(str(models["sharded"]))
    for result in results:
        for b, sums in result.items():
            state = reference.block_state(f"model.layers.{b}.", dtype=torch.float32)
            assert sums == {k: float(v.double().sum()) for k, v in sorted(state.items())}
    # every file was downloaded once, by whichever process got the exclusive lock first
    needed = shards_of(models["sharded"], [1, 2, 3])
    assert hub.gets() == Counter({"config.json": 1, INDEX: 1, **{f: 1 for f in needed}})


# --- a whole node -----------------------------------------------------------------------------
