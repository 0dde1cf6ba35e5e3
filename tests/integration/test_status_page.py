"""The status page on the metrics port, opened in a real browser (headless Chromium).

Two nodes share a private swarm (blocks 0:2 and 2:4 of micro-llama); a client generates through both
while one of the first node's actors is killed. The page must draw both servers over their blocks with
this node marked, one row per actor, and charts with data points, the restart marked; `/status.json`
must agree with `python -m node.probe RUN_DIR --stats` (one source of figures).

Chromium is the Debian package, which .ci/install installs where it can; without it the browser part
is skipped with the reason. STATUS_PAGE_SCREENSHOT=PATH keeps the screenshot (docs/status_page.png is
one, shown in the README).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request

import pytest
import torch

from node.client.swarm import Client
from node.tools.launcher import ROOT, NodeProcess
from tests.helpers.paths import MICRO_LLAMA
from tests.helpers.petals import PETALS_PYTHON, petals_llama, start_petals_server, why_missing
from tests.helpers.waiting import wait_until

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


HEADLESS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


def browser() -> str:
    """Chromium's path, once it has shown it can render a page here; otherwise the test skips, saying why."""
    path = next((p for p in map(shutil.which, BROWSERS) if p), None)
    if path is None:
        pytest.skip("no Chromium here (.ci/install installs the Debian package `chromium` where apt can)")
    try:
        done = subprocess.run(
            [path, *HEADLESS, "--dump-dom", "about:blank"], capture_output=True, text=True, timeout=90
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"{path} does not start here (no page within 90 s)")
    if "<html" not in done.stdout:
        pytest.skip(f"{path} cannot render a page here: {done.stderr.strip()[-300:]}")
    return path


def fetch(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    base = tmp_path_factory.mktemp("status")
    first = NodeProcess(
        MICRO_LLAMA, base / "a", "--block_indices", "0:2", "--metrics_port", "0", "--public_name", "node-a"
    )
    with first:
        second = NodeProcess(MICRO_LLAMA, base / "b", "--block_indices", "2:4", "--initial_peers", *first.maddrs)
        with second:
            with Client(first.maddrs, "micro-llama") as client:
                wait_until(lambda: len(client.route(0, 4)) == 2, 60, "a route over both nodes", first)
                yield first, second, client


def generate(client, n: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, n + 4, 64)
    with client.session(max_length=n + 4, start=0, end=4) as session:
        session.step(x[:, :4])
        for t in range(4, n + 4):
            session.step(x[:, t : t + 1])


def test_status_json_shows_the_node_its_actors_the_swarm_and_the_last_minutes(swarm):
    first, second, client = swarm
    port = first.status["metrics_port"]
    generate(client, 16)
    old = first.status["actors"]["allocator"]["pid"]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: first.status["actors"]["allocator"]["pid"] != old, 30, "a new allocator", first)
    generate(client, 16)

    def data() -> dict:
        return json.loads(fetch(port, "/status.json"))

    wait_until(
        lambda: len(data()["swarm"]["models"]) == 1 and len(data()["swarm"]["models"][0]["servers"]) == 2,
        60,
        "both servers on the page",
        first,
    )
    status = data()
    node = status["node"]
    assert node["state"] == "online" and node["blocks"] == [0, 2] and node["peer_id"] == first.peer_id
    assert {a["name"] for a in status["actors"]} == set(first.status["actors"])
    assert all(a["pid"] and a["figures"] for a in status["actors"])
    model = status["swarm"]["models"][0]
    assert model["prefix"] == "micro-llama" and model["coverage"] == [1, 1, 1, 1]
    spans = {(s["start"], s["end"]): s for s in model["servers"]}
    assert spans[(0, 2)]["this_node"] and spans[(0, 2)]["public_name"] == "node-a"
    assert not spans[(2, 4)]["this_node"] and spans[(2, 4)]["peer_id"] == second.peer_id
    samples = status["timeline"]["samples"]
    assert any(s["tokens_per_s"] > 0 for s in samples) and any(s["step_p50_ms"] for s in samples)
    assert any(e["actor"] == "allocator" for e in status["timeline"]["events"])
    assert b"node_requests_total" in fetch(port, "/metrics")  # the metrics are still there
    request = urllib.request.Request(f"http://127.0.0.1:{port}/status.json", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError, match="405"):
        urllib.request.urlopen(request, timeout=10)  # the page only reads


def test_the_probe_shows_the_page_s_figures(swarm):
    """`node.probe --stats` and /status.json read the same stats structs through one selection (figures):
    a figure the page shows the same before and after the probe ran, the probe shows too (the announcer's
    count of stored records moves when the other node announces: such a read is taken again)."""
    first, _, _ = swarm

    def page() -> dict:
        actors = json.loads(fetch(first.status["metrics_port"], "/status.json"))["actors"]
        return {a["name"]: a["figures"] for a in actors}

    checked = set()
    keys = (("allocator", "capacity_bytes"), ("runtime.0", "blocks_held"), ("announcer", "stored"))
    for _ in range(5):
        before = page()
        out = subprocess.run(
            [sys.executable, "-m", "node.probe", str(first.run_dir), "--stats", "--once"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        after = page()
        for actor, key in keys:
            if before[actor][key] != after[actor][key]:
                continue  # moved while the probe ran
            line = next(line for line in out.splitlines() if line.startswith(actor + " "))
            shown = re.search(rf"\b{key}=(\S+)", line).group(1)
            assert shown == str(after[actor][key]), (actor, key, line, after[actor])
            checked.add((actor, key))
        if checked == set(keys):
            break
    assert checked == set(keys), f"these figures moved on every read: {set(keys) - checked}"
    runtime_line = next(line for line in out.splitlines() if line.startswith("runtime.0 "))
    assert set(re.findall(r"\b(\w+)=", runtime_line)) >= set(after["runtime.0"])


def test_the_page_in_a_browser_draws_the_swarm_the_actors_and_the_charts(swarm, tmp_path):
    chromium = browser()
    first, _, client = swarm
    generate(client, 8)
    url = f"http://127.0.0.1:{first.status['metrics_port']}/"
    flags = [*HEADLESS, "--virtual-time-budget=5000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert 'class="server this-node"' in dom and 'data-start="0" data-end="2"' in dom, dom[:3000]
    assert dom.count('class="server') == 2  # both nodes drawn over the model's blocks
    for actor in first.status["actors"]:
        assert f'data-actor="{actor}"' in dom
    points = {m.group(1): int(m.group(2)) for m in re.finditer(r'data-series="(\w+)" data-points="(\d+)"', dom)}
    assert points["tokens_per_s"] > 0 and points["step_p50_ms"] > 0 and points["sessions"] > 0
    assert 'class="event"' in dom  # the allocator killed in the test before is marked
    shot = os.environ.get("STATUS_PAGE_SCREENSHOT") or str(tmp_path / "status.png")
    subprocess.run(
        [chromium, *flags, "--window-size=1280,1500", f"--screenshot={shot}", "--hide-scrollbars", url],
        capture_output=True,
        timeout=120,
    )
    assert os.path.getsize(shot) > 20_000  # a drawn page, not a blank one


@pytest.mark.petals
@pytest.mark.skipif(not PETALS_PYTHON, reason=why_missing())
def test_a_petals_server_in_the_swarm_is_on_the_page(tmp_path):
    """A Petals server beside the node: the page draws it over its blocks with its own version."""
    from node.bench_petals import stop_group

    model = petals_llama(tmp_path)
    with NodeProcess(model, tmp_path / "node", "--block_indices", "0:2", "--metrics_port", "0") as node:
        server, _ = start_petals_server(model, tmp_path / "petals.log", node.maddrs, "--block_indices", "2:4")
        try:
            port = node.status["metrics_port"]

            def servers() -> list:
                models = json.loads(fetch(port, "/status.json"))["swarm"]["models"]
                return models[0]["servers"] if models else []

            wait_until(lambda: len(servers()) == 2, 90, "the Petals server on the page", node)
            theirs = next(s for s in servers() if not s["this_node"])
            assert (theirs["start"], theirs["end"], theirs["state"]) == (2, 4, "online")
            assert theirs["version"] and "node" not in theirs["version"]  # Petals' own version string
        finally:
            stop_group(server)
