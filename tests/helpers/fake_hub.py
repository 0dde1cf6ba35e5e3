"""A local stand-in for the Hugging Face hub: the real huggingface_hub code against an HTTP server that
speaks the part of the hub's API that downloads use, serving repositories made here.

The server answers HEAD/GET /{repo}/resolve/{revision}/{file} as huggingface.co does: small files
directly (ETag = git blob sha1), safetensors files (LFS) with a 302 to a "CDN" path and their sha256 in
X-Linked-Etag / X-Linked-Size; errors carry X-Error-Code as the hub's do. It records every request, and
can cut a download short, slow it down, or hold it half-way.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote

import pytest
import torch

from node.tools.tinymodel import make_tiny_llama
from node.weights.checkpoint import Checkpoint
from node.weights.store import WeightStore

SIZE = dict(hidden_size=64, num_layers=6, num_heads=4, num_kv_heads=2, vocab_size=128)


INDEX = "model.safetensors.index.json"


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
            name, content = hub.blobs[path[len("/cdn/") :]]
            hub.record(method=self.command, file=name, path=path, range=self.headers.get("Range"), body=body)
            return self.send_file(name, content, body)
        parts = path.strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            hub.record(method=self.command, file=None, path=path)
            return self.error(404, message="not a resolve url")
        repo_id, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        hub.record(
            method=self.command,
            file=name,
            path=path,
            revision=revision,
            auth=self.headers.get("Authorization"),
            range=self.headers.get("Range"),
            body=body and not is_lfs(name),
        )
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
            return self.reply(
                302,
                {
                    "Location": f"{hub.url}/cdn/{sha}",
                    "X-Repo-Commit": commit,
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": len(content),
                    "ETag": f'"{git_sha1(content)}"',
                },
            )
        self.send_file(name, content, body, {"X-Repo-Commit": commit, "ETag": f'"{git_sha1(content)}"'})

    def send_file(self, name: str, content: bytes, body: bool, headers: Optional[dict] = None) -> None:
        hub = self.server
        start, status, headers = 0, 200, dict(headers or {}, **{"Accept-Ranges": "bytes"})
        requested = self.headers.get("Range")
        if requested and requested.startswith("bytes=") and requested.endswith("-"):
            start, status = int(requested[len("bytes=") : -1]), 206
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
