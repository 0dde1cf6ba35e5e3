"""Weights from the hub (PROTOCOL 5.11), with the real huggingface_hub code against a local HTTP server
that speaks the part of the hub's API that downloads use, serving repositories made here.

The server answers HEAD/GET /{repo}/resolve/{revision}/{file} as huggingface.co does: small files
directly (ETag = git blob sha1), safetensors files (LFS) with a 302 to a "CDN" path and their sha256 in
X-Linked-Etag / X-Linked-Size; errors carry X-Error-Code as the hub's do. It records every request, and
can cut a download short, slow it down, or hold it half-way.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote

import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError

from node.weights.checkpoint import Checkpoint
from node.tools.launcher import NodeProcess
from node.tools.tinymodel import make_tiny_llama
from node.weights.store import DownloadFailed, HubAccessError, NotEnoughDiskSpace, WeightStore
from tests.conftest import ROOT, hf_blocks, rel_err

SIZE = dict(hidden_size=64, num_layers=6, num_heads=4, num_kv_heads=2, vocab_size=128)
INDEX = "model.safetensors.index.json"


# --- a local hub ------------------------------------------------------------------------------


class Hub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.repos: dict[str, dict[str, tuple[str, dict[str, bytes]]]] = {}  # repo -> revision -> (commit, files)
        self.blobs: dict[str, tuple[str, bytes]] = {}  # sha256 -> (file name, content) for the CDN path
        self.token: Optional[str] = None
        self.log: list[dict] = []  # one entry per request
        self.cut: Counter = Counter()  # file -> how many more GETs to cut short
        self.cut_fraction = 0.5  # of the body sent before a cut
        self.delay = 0.0  # seconds spent on each file body
        self.hold: dict[str, threading.Event] = {}  # file -> released by the test; the body stops half-way
        self.holding = threading.Event()  # set while a body is held
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def add(self, repo_id: str, directory, revision: str = "main") -> None:
        files = {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}
        commit = hashlib.sha1(f"{repo_id}@{revision}".encode() + b"".join(files[n] for n in sorted(files))).hexdigest()
        self.repos.setdefault(repo_id, {})[revision] = (commit, files)
        for name, content in files.items():
            if is_lfs(name):
                self.blobs[hashlib.sha256(content).hexdigest()] = (name, content)

    def record(self, **entry) -> None:
        with self._lock:
            self.log.append(entry)

    def gets(self) -> Counter:
        """How many times each file's content was requested."""
        return Counter(e["file"] for e in self.log if e["method"] == "GET" and e.get("body"))

    def files_touched(self) -> set:
        return {e["file"] for e in self.log}

    def close(self) -> None:
        for event in self.hold.values():
            event.set()
        self.shutdown()
        self.server_close()


def is_lfs(name: str) -> bool:
    return name.endswith(".safetensors")


def git_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Hub

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.handle_request(body=False)

    def do_GET(self):
        self.handle_request(body=True)

    def reply(self, status: int, headers: dict, body: bytes = b"") -> None:
        self.send_response(status)
        headers.setdefault("Content-Length", len(body))
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def error(self, status: int, code: Optional[str] = None, message: Optional[str] = None, **headers) -> None:
        if code:
            headers["X-Error-Code"] = code
        if message:
            headers["X-Error-Message"] = message
        self.reply(status, headers, json.dumps({"error": message or code or ""}).encode())

    def handle_request(self, body: bool) -> None:
        hub = self.server
        path = unquote(self.path.split("?", 1)[0])
        if path.startswith("/cdn/"):  # where LFS files are redirected, as to a CDN (no token needed)
            name, content = hub.blobs[path[len("/cdn/"):]]
            hub.record(method=self.command, file=name, path=path, range=self.headers.get("Range"), body=body)
            return self.send_file(name, content, body)
        parts = path.strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            hub.record(method=self.command, file=None, path=path)
            return self.error(404, message="not a resolve url")
        repo_id, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        hub.record(method=self.command, file=name, path=path, revision=revision,
                   auth=self.headers.get("Authorization"), range=self.headers.get("Range"), body=body and not is_lfs(name))
        if hub.token is not None and self.headers.get("Authorization") != f"Bearer {hub.token}":
            if self.headers.get("Authorization"):
                return self.error(401, message="Invalid credentials in Authorization header")
            return self.error(401, "RepoNotFound", "Repository not found")
        if repo_id not in hub.repos:
            return self.error(401, "RepoNotFound", "Repository not found")
        if revision not in hub.repos[repo_id]:
            return self.error(404, "RevisionNotFound", "Invalid rev id: " + revision)
        commit, files = hub.repos[repo_id][revision]
        if name not in files:
            return self.error(404, "EntryNotFound", "Entry not found", **{"X-Repo-Commit": commit})
        content = files[name]
        if is_lfs(name):
            sha = hashlib.sha256(content).hexdigest()
            return self.reply(302, {
                "Location": f"{hub.url}/cdn/{sha}", "X-Repo-Commit": commit, "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": len(content), "ETag": f'"{git_sha1(content)}"',
            })
        self.send_file(name, content, body, {"X-Repo-Commit": commit, "ETag": f'"{git_sha1(content)}"'})

    def send_file(self, name: str, content: bytes, body: bool, headers: Optional[dict] = None) -> None:
        hub = self.server
        start, status, headers = 0, 200, dict(headers or {}, **{"Accept-Ranges": "bytes"})
        requested = self.headers.get("Range")
        if requested and requested.startswith("bytes=") and requested.endswith("-"):
            start, status = int(requested[len("bytes="):-1]), 206
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        part = content[start:]
        if not body:
            return self.reply(status, {**headers, "Content-Length": len(part)})
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        with hub._lock:
            cut = hub.cut[name] > 0
            if cut:
                hub.cut[name] -= 1
        half = int(len(part) * hub.cut_fraction) if cut else len(part) // 2
        self.wfile.write(part[:half])
        self.wfile.flush()
        if cut:
            self.close_connection = True  # the client sees the connection end before Content-Length
            return
        if name in hub.hold:
            hub.holding.set()
            hub.hold[name].wait(20)
        time.sleep(hub.delay)
        self.wfile.write(part[half:])


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("hub-models")
    return dict(
        single=Path(make_tiny_llama(str(base / "single"), seed=7, **SIZE)),
        sharded=Path(make_tiny_llama(str(base / "sharded"), seed=7, shards=3, **SIZE)),
        other=Path(make_tiny_llama(str(base / "other"), seed=8, shards=3, **SIZE)),
    )


@pytest.fixture
def hub(models):
    server = Hub()
    server.add("org/single", models["single"])
    server.add("org/sharded", models["sharded"])
    yield server
    server.close()


def cache(tmp_path, hub, **kwargs) -> WeightStore:
    return WeightStore(str(tmp_path / "cache"), endpoint=hub.url, backoff=0.05, progress=False, **kwargs)


def shards_of(model_dir: Path, blocks) -> set:
    weight_map = json.loads((model_dir / INDEX).read_text())["weight_map"]
    return {f for n, f in weight_map.items() if any(n.startswith(f"model.layers.{b}.") for b in blocks)}


def all_shards(model_dir: Path) -> set:
    return set(json.loads((model_dir / INDEX).read_text())["weight_map"].values())


def same_block(checkpoint: Checkpoint, model_dir: Path, index: int) -> bool:
    got = checkpoint.block_state(f"model.layers.{index}.", dtype=torch.float32)
    want = Checkpoint.open(str(model_dir)).block_state(f"model.layers.{index}.", dtype=torch.float32)
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


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
    resumed_at = int(gets[1]["range"][len("bytes="):-1])
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
        worker = threading.Thread(target=lambda: done.append(weights.fetch("org/sharded", "model-00002-of-00004.safetensors")))
        worker.start()
        assert hub.holding.wait(10)
        with pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        hub.hold["model-00002-of-00004.safetensors"].set()
        worker.join(10)
        assert done
        # 2. while another process reads, a download waits
        fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        worker = threading.Thread(target=lambda: done.append(weights.fetch("org/sharded", "model-00003-of-00004.safetensors")))
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
        subprocess.Popen([sys.executable, "-c", LOADER, "org/sharded", cache_dir, *blocks], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def test_node_serves_blocks_from_the_hub(hub, models, tmp_path):
    from transformers import AutoModelForCausalLM

    from node.client.swarm import Client

    node = NodeProcess("org/sharded", tmp_path / "node", "--block_indices", "1:3", "--cache_dir", str(tmp_path / "cache"),
                       dht_prefix="tiny-hub", env={"HF_ENDPOINT": hub.url})
    with node:
        needed = shards_of(models["sharded"], [1, 2])
        assert hub.gets() == Counter({"config.json": 1, INDEX: 1, **{f: 1 for f in needed}})
        client = Client(node.maddrs, "tiny-hub")
        try:
            torch.manual_seed(0)
            hidden = torch.randn(2, 5, 64)
            out = client.forward(hidden, 1, 3)
        finally:
            client.close()
    model = AutoModelForCausalLM.from_pretrained(str(models["sharded"]), dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(out, hf_blocks(model, hidden, 1, 3)) <= 1e-5


def test_node_exits_2_naming_the_flag_when_the_hub_refuses(hub, tmp_path):
    hub.token = "secret"
    result = subprocess.run(
        [sys.executable, "-m", "node.supervisor", "--model", "org/sharded", "--token", "wrong", "--new_swarm",
         "--cache_dir", str(tmp_path / "cache"), "--run_dir", str(tmp_path / "run")],
        cwd=ROOT, env={**os.environ, "HF_ENDPOINT": hub.url, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "--token" in result.stderr and "HTTP 401" in result.stderr
    assert len(hub.log) == 1
