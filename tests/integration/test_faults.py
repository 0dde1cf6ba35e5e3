"""Fault injection on whole nodes (DESIGN 4, Health and Shutdown), with real processes and signals.

- kill -9 of any actor: a replacement gets ready, the node serves again within 10 s, the peer id and
  the DHT announcement stay, and no other actor is restarted;
- requests waiting on a runtime or an allocator that dies (killed, or hung and then killed by the
  supervisor) get an error at once, not a hang; the node serves new requests and sessions after;
  an idle session whose runtime died says its cache is gone; sessions survive an allocator restart;
- a frontend that dies (killed, or hung and killed): its sessions go on through another frontend (the
  stream keeper hands their streams over), the allocator frees its grants, and p2pd no longer routes
  calls to it (a unary call the frontend held when it died is answered by its replacement: the keeper
  holds unary calls);
- a hung actor (SIGSTOP) is detected by its missing heartbeats and replaced;
- too many restarts in the window: OFFLINE, exit non-zero, nothing left behind;
- SIGTERM / SIGINT: OFFLINE, in-flight work finishes or fails within the grace period, exit 0,
  nothing left behind (p2pd included); kill -9 of the supervisor leaves nothing behind either;
- a graceful stop drains: new sessions and forwards are refused (the client goes elsewhere), open
  sessions are served until their clients close them; a second signal stops at once; a session open
  when --shutdown_grace ends is told so.

The nodes join a private swarm through a bootstrap DHT peer that lives in this test process, as a
Petals swarm would: their records stay visible while an announcer restarts and after a node exits
(so the OFFLINE record can be read back). Requests go straight to the node's peer id (not routed
through the DHT) so that a node announced JOINING during a restart is still asked.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

import psutil
import pytest
import torch

from node.client.swarm import Client, RemoteSpan
from node.tools.launcher import NodeProcess
from protocol.dht_records import ServerState, from_tuple
from tests.helpers.paths import MICRO_LLAMA
from tests.helpers.reference import hf_blocks, rel_err
from tests.helpers.waiting import wait_until

PREFIX = "micro-llama"
NUM_BLOCKS = 4
TOL = 1e-5
RECOVERY_LIMIT = 10.0  # the issue: the node serves again within 10 s of a kill -9 on a tiny model
ERROR_LIMIT = 5.0  # an in-flight request must fail this soon (the node's --request_timeout is 60 s)
HEARTBEAT_TIMEOUT = 3.0
ACTORS = ("announcer", "allocator", "runtime.0", "frontend.0", "keeper")

RECOVERY_TIMES: dict[str, float] = {}  # printed at the end of the module (run with -s to see them)


def recovery_limit() -> float:
    """RECOVERY_LIMIT on a host with a free core per runnable process. A replacement spends most of its
    restart importing torch (CPU bound), so on a host shared with other work (load average above the
    core count) the limit stretches by load / cores; the measured times are printed either way."""
    return RECOVERY_LIMIT * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


# --- a private swarm: one bootstrap DHT peer in this process ----------------------------------


class Bootstrap:
    """A plain hivemind DHT server on its own event loop thread: the swarm the nodes join."""

    def __init__(self):
        from hivemind.dht.node import DHTNode

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bootstrap-dht", daemon=True)
        self.thread.start()
        self.dht = self.run(DHTNode.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
        self.maddrs = [str(m) for m in self.run(self.dht.p2p.get_visible_maddrs())]

    def run(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.run(self.dht.shutdown(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def swarm():
    bootstrap = Bootstrap()
    yield bootstrap.maddrs
    bootstrap.close()
    if RECOVERY_TIMES:
        print(
            "\nrecovery after kill -9 / hang (s):",
            json.dumps({k: round(v, 2) for k, v in RECOVERY_TIMES.items()}),
            f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)",
        )


@pytest.fixture(scope="module")
def client(swarm):
    c = Client(swarm, PREFIX)
    yield c
    c.close()


@pytest.fixture(scope="module")
def sample(micro_hf):
    """An input and what transformers makes of it through all 4 blocks."""
    torch.manual_seed(11)
    hidden = torch.randn(1, 6, 64)
    with torch.no_grad():
        return hidden, hf_blocks(micro_hf, hidden, 0, NUM_BLOCKS)


def start_node(tmp_path_factory, swarm, *flags: str) -> NodeProcess:
    run_dir = tmp_path_factory.mktemp("fault") / "node"  # short: unix socket paths are limited
    node = NodeProcess(
        MICRO_LLAMA, run_dir, "--initial_peers", *swarm, "--request_timeout", "60", *flags, dht_prefix=PREFIX
    )
    try:
        node.start(timeout=120)
    except BaseException:
        node.stop(signal.SIGKILL)
        raise
    return node


@pytest.fixture(scope="class")
def shared(tmp_path_factory, swarm):
    """One node for the kill -9 / hang cases, which run one after the other: one frontend (so that
    killing it really interrupts service), a short heartbeat timeout, and room for many restarts."""
    node = start_node(tmp_path_factory, swarm, "--heartbeat_timeout", str(HEARTBEAT_TIMEOUT), "--max_restarts", "100")
    yield node
    node.stop()


# --- helpers ---------------------------------------------------------------------------------


def span_of(node: NodeProcess) -> RemoteSpan:
    return RemoteSpan(node.peer_id, 0, NUM_BLOCKS, None)


async def _bounded(coroutine, timeout: float):
    return await asyncio.wait_for(coroutine, timeout)


def call(client: Client, coroutine, timeout: float):
    """Run a client coroutine; a hang becomes asyncio.TimeoutError after `timeout` seconds."""
    return client.run(_bounded(coroutine, timeout), timeout=timeout + 5)


def background(client: Client, coroutine, timeout: float):
    """Start a client coroutine without waiting: a concurrent.futures.Future."""
    return asyncio.run_coroutine_threadsafe(_bounded(coroutine, timeout), client._loop)


async def _session_output(swarm_client, span: RemoteSpan, hidden: torch.Tensor) -> torch.Tensor:
    async with swarm_client.inference_session(hidden.shape[1], 0, NUM_BLOCKS, route=[span]) as session:
        first = await session.step(hidden[:, :4])
        rest = await session.step(hidden[:, 4:])
    return torch.cat([first, rest], dim=1)


def check_serves(client: Client, node: NodeProcess, sample) -> None:
    """A forward and a whole inference session through the node, both equal to transformers."""
    hidden, ref = sample
    span = span_of(node)
    out = call(client, client.swarm.forward_span(span, hidden), 5)
    assert rel_err(out, ref) <= TOL
    out = call(client, _session_output(client.swarm, span, hidden), 10)
    assert rel_err(out, ref) <= TOL


def wait_serving(client: Client, node: NodeProcess, sample, deadline: float) -> float:
    """Poll until the node serves again; the time it first did."""
    last: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            check_serves(client, node, sample)
            return time.monotonic()
        except AssertionError:
            raise
        except Exception as e:  # not yet: the replacement is still starting
            last = e
            time.sleep(0.1)
    raise AssertionError(f"the node does not serve again: {last!r}\n{node.log_tail(30)}")


def record(client: Client, peer: str):
    """The node's ServerInfo for block 0 and its expiration, as the swarm holds them (or None)."""
    uid = f"{PREFIX}.0"
    found = call(client, client.swarm.dht.get(uid, latest=True), 10)
    if found is None or not isinstance(found.value, dict) or peer not in found.value:
        return None, None
    item = found.value[peer]
    return from_tuple(item.value), item.expiration_time


def cache_available(client: Client, peer: str, uid: str) -> Optional[int]:
    try:
        return call(client, client.swarm.rpc_info(peer, uid), 2)["cache_tokens_available"]
    except Exception:
        return None  # e.g. p2pd handed the call to the frontend that just died


def alive(pids) -> list[int]:
    """The pids among `pids` that still run (a zombie is dead: it only waits to be reaped)."""
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def p2pd_of(run_dir: Path) -> list[int]:
    """Any p2pd still listening on this node's control socket."""
    needle = str(run_dir / "p2pd.sock")
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and any(needle in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def offline_announced(node: NodeProcess) -> bool:
    return any(
        e.get("event") == "announced" and e.get("actor") == "announcer" and e.get("state") == "OFFLINE"
        for e in node.log_events()
    )


def assert_nothing_left(node: NodeProcess, pids: list[int], timeout: float = 10) -> None:
    wait_until(
        lambda: not alive(pids) and not p2pd_of(node.run_dir),
        timeout,
        f"processes left behind: {alive(pids)}, p2pd {p2pd_of(node.run_dir)}",
    )


def sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def signal_if_stopped(pid: int, sig: int) -> None:
    """Kill or resume a process this test stopped, if it is still there and stopped (not a reused pid)."""
    try:
        if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
            os.kill(pid, sig)
    except (psutil.NoSuchProcess, ProcessLookupError):
        pass


# --- kill -9 of each actor ----------------------------------------------------------------------


class TestOneNode:
    """kill -9 and SIGSTOP of each actor of one node, one after the other."""

    @pytest.mark.parametrize("name", ACTORS)
    def test_kill9_actor_is_replaced_and_node_serves_again(self, name, shared, client, sample):
        node = shared
        check_serves(client, node, sample)
        peer = node.peer_id
        before = node.status["actors"]
        old_pid = before[name]["pid"]
        _, expiration_before = record(client, peer)

        t0 = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        if name == "announcer":
            # the node keeps serving and keeps its state while its announcer restarts
            check_serves(client, node, sample)
            assert node.status["state"] == "online"
            info, _ = record(client, peer)
            assert info is not None and info.state == ServerState.ONLINE
        new_pid = node.wait_ready(name, old_pid, timeout=30)
        wait_until(lambda: node.status.get("state") == "online", 30, "node not ONLINE again", node)
        wait_serving(client, node, sample, t0 + 30)
        if name == "announcer":  # its successor stored the record again (a later expiration)

            def reannounced():
                info, expiration = record(client, peer)
                return info is not None and info.state == ServerState.ONLINE and expiration > expiration_before

            wait_until(reannounced, 30, "the new announcer did not announce ONLINE", node)
        recovery = time.monotonic() - t0  # every condition above holds from here on
        RECOVERY_TIMES[name] = recovery

        after = node.status
        assert after["peer_id"] == peer
        assert new_pid != old_pid and not alive([old_pid])
        assert after["actors"][name]["restarts"] == before[name]["restarts"] + 1
        for other, entry in before.items():  # nobody else was restarted
            if other != name:
                assert after["actors"][other]["pid"] == entry["pid"], other
                assert after["actors"][other]["restarts"] == entry["restarts"], other
        spans = wait_until(lambda: client.spans(NUM_BLOCKS), 10, "no ONLINE record in the DHT", node)
        assert [(s.peer_id, s.start, s.end, s.info.state) for s in spans] == [(peer, 0, NUM_BLOCKS, ServerState.ONLINE)]
        assert recovery < recovery_limit(), f"{name}: served again only {recovery:.1f} s after kill -9"

    # --- requests in flight when the runtime or the allocator dies --------------------------------

    def test_runtime_kill9_requests_in_flight_are_served_by_its_replacement(self, shared, client, sample):
        """A forward, a large forward (rpc_forward_stream) and an inference step wait in the queue of a
        runtime that is stopped, then killed: the frontend sends each again to the replacement (the
        session's cache rebuilt first), and each gets its right answer: the client sees only the delay."""
        node = shared
        hidden, ref = sample
        span = span_of(node)
        torch.manual_seed(12)
        big = torch.randn(1, 4200, 64)  # over 1 MB: the client uses rpc_forward_stream
        session = client.session(64, 0, NUM_BLOCKS, route=[span])
        session.__enter__()
        try:
            assert rel_err(session.step(hidden[:, :4]), ref[:, :4]) <= TOL
            runtime = node.actor_pid("runtime.0")
            os.kill(runtime, signal.SIGSTOP)
            try:
                pending = {
                    "rpc_forward": background(client, client.swarm.forward_span(span, hidden), 30),
                    "rpc_forward_stream": background(client, client.swarm.forward_span(span, big), 30),
                    "rpc_inference": background(client, session.session.step(hidden[:, 4:]), 30),
                }
                time.sleep(1.5)  # the requests reach the frontend and wait on the stopped runtime
                assert not [rpc for rpc, f in pending.items() if f.done()]
                t0 = time.monotonic()
            finally:
                sigkill(runtime)
            limit = recovery_limit()
            assert rel_err(pending["rpc_forward"].result(timeout=limit + 30), ref) <= TOL
            assert pending["rpc_forward_stream"].result(timeout=limit + 30).shape == big.shape
            assert rel_err(pending["rpc_inference"].result(timeout=limit + 30), ref[:, 4:]) <= TOL
            answered = time.monotonic() - t0
            assert call(client, session.session.step(hidden[:, :1], start_from_position=0), 30).shape == (1, 1, 64)
        finally:
            try:
                session.__exit__(None, None, None)
            except Exception:
                pass
        RECOVERY_TIMES["runtime.0 (requests in flight answered)"] = answered
        assert answered < limit

    def test_runtime_kill9_an_idle_session_is_rebuilt(self, shared, client, sample):
        """An idle session whose runtime died: its next step rebuilds the cache on the replacement from the
        session's history and gives what it would have given."""
        node = shared
        hidden, ref = sample
        span = span_of(node)
        session = client.session(64, 0, NUM_BLOCKS, route=[span])
        session.__enter__()
        try:
            assert rel_err(session.step(hidden[:, :4]), ref[:, :4]) <= TOL
            runtime = node.actor_pid("runtime.0")
            t0 = time.monotonic()
            os.kill(runtime, signal.SIGKILL)
            node.wait_ready("runtime.0", runtime, timeout=30)
            assert rel_err(call(client, session.session.step(hidden[:, 4:]), 30), ref[:, 4:]) <= TOL
        finally:
            try:
                session.__exit__(None, None, None)
            except Exception:
                pass
        served = wait_serving(client, node, sample, t0 + 30) - t0
        assert served < recovery_limit()

    def test_allocator_kill9_requests_waiting_are_served_and_sessions_kept(self, shared, client, sample):
        """A session opening and an rpc_info wait on a stopped allocator, which is then killed: both are
        asked again of the replacement and served. A session opened before lives on: the new allocator
        adopts its grant."""
        node = shared
        hidden, ref = sample
        peer, span, uid = node.peer_id, span_of(node), f"{PREFIX}.0"
        full = client.rpc_info(peer, uid)["cache_tokens_available"]
        kept = client.session(64, 0, NUM_BLOCKS, route=[span])
        kept.__enter__()
        try:
            assert rel_err(kept.step(hidden[:, :3]), ref[:, :3]) <= TOL
            holding = client.rpc_info(peer, uid)["cache_tokens_available"]
            assert holding < full
            allocator = node.actor_pid("allocator")
            os.kill(allocator, signal.SIGSTOP)
            try:
                pending = {
                    "rpc_inference": background(client, _session_output(client.swarm, span, hidden), 30),
                    "rpc_info": background(client, client.swarm.rpc_info(peer, uid), 30),
                }
                time.sleep(1.0)
                assert not [rpc for rpc, f in pending.items() if f.done()]
                t0 = time.monotonic()
            finally:
                sigkill(allocator)
            limit = recovery_limit()
            assert rel_err(pending["rpc_inference"].result(timeout=limit + 30), ref) <= TOL
            assert pending["rpc_info"].result(timeout=limit + 30)["cache_tokens_available"] > 0
            RECOVERY_TIMES["allocator (requests waiting answered)"] = time.monotonic() - t0
            node.wait_ready("allocator", allocator, timeout=30)
            wait_serving(client, node, sample, t0 + recovery_limit())
            # the old session goes on, and the new allocator counts its cache
            assert rel_err(kept.step(hidden[:, 3:]), ref[:, 3:]) <= TOL
            wait_until(
                lambda: cache_available(client, peer, uid) == holding,
                ERROR_LIMIT,
                "the new allocator does not count the open session",
                node,
            )
        finally:
            kept.__exit__(None, None, None)
        wait_until(
            lambda: cache_available(client, peer, uid) == full, ERROR_LIMIT, "the session's cache stays taken", node
        )

    # --- a hung actor --------------------------------------------------------------------------

    @pytest.mark.parametrize("name", ["runtime.0", "frontend.0"])
    def test_hung_actor_is_replaced(self, name, shared, client, sample):
        """SIGSTOP (not killed): the supervisor misses its heartbeats, kills it and starts a new one.
        A hung runtime: the step and the forward waiting on it are answered by its replacement (the
        session's cache rebuilt), not left waiting for --request_timeout. A hung frontend: the session goes
        on (the stream keeper hands its stream over; a unary call it held: the test below)."""
        node = shared
        hidden, ref = sample
        check_serves(client, node, sample)
        span = span_of(node)
        restarts = node.status["actors"][name]["restarts"]
        session = client.session(64, 0, NUM_BLOCKS, route=[span])
        session.__enter__()
        pid = node.actor_pid(name)
        try:
            assert rel_err(session.step(hidden[:, :3]), ref[:, :3]) <= TOL
            t0 = time.monotonic()
            os.kill(pid, signal.SIGSTOP)
            if name == "runtime.0":
                waiting = {
                    "rpc_inference": background(client, session.session.step(hidden[:, 3:5]), 30),
                    "rpc_forward": background(client, client.swarm.forward_span(span, hidden), 30),
                }
                bound = HEARTBEAT_TIMEOUT + recovery_limit()
                assert rel_err(waiting["rpc_inference"].result(timeout=bound + 10), ref[:, 3:5]) <= TOL
                assert rel_err(waiting["rpc_forward"].result(timeout=bound + 10), ref) <= TOL
                failed_after = time.monotonic() - t0
            node.wait_ready(name, pid, timeout=30)
            if name == "frontend.0":  # the session's stream, if it held it, was handed over (the keeper)
                began = time.monotonic()
                assert rel_err(call(client, session.session.step(hidden[:, 3:5]), ERROR_LIMIT), ref[:, 3:5]) <= TOL
                failed_after = time.monotonic() - began
        finally:
            signal_if_stopped(pid, signal.SIGKILL)  # whatever happened, never leave it stopped
            try:
                session.__exit__(None, None, None)
            except Exception:
                pass
        served = wait_serving(client, node, sample, t0 + 40) - t0
        RECOVERY_TIMES[f"{name} (hung)"] = served
        silent = [e for e in node.log_events() if e.get("event") == "actor silent; killing it" and e.get("pid") == pid]
        assert silent and silent[0]["actor"] == name
        assert node.status["actors"][name]["restarts"] == restarts + 1
        if name == "runtime.0":  # answered by the replacement: the hang's detection plus a restart
            assert failed_after < HEARTBEAT_TIMEOUT + recovery_limit()
        else:
            assert failed_after < HEARTBEAT_TIMEOUT + ERROR_LIMIT
        assert served < HEARTBEAT_TIMEOUT + recovery_limit()

    def test_calls_held_by_a_killed_frontend_are_answered_by_its_replacement(self, shared, client, sample, micro_hf):
        """p2pd leaves a unary call waiting for good when the process that took it dies, and a stream dies
        with the process that accepted it; the keeper holds both (a forward or backward stream read whole)
        and asks the frontend's replacement: rpc_forward, rpc_backward, rpc_info, rpc_forward_stream and
        rpc_backward_stream taken by a frontend that is then killed are answered, with transformers'
        outputs, the caller only sees a delay."""
        node = shared
        hidden, ref = sample
        span = span_of(node)
        check_serves(client, node, sample)
        grad_out = torch.randn_like(hidden)
        expected_grad = call(client, client.swarm.backward_span(span, hidden, grad_out), 10)[0]
        big = torch.randn(1, 4200, 64)  # over 1 MB: the client streams it
        big_grad = torch.randn_like(big)
        big_ref = hf_blocks(micro_hf, big, 0, NUM_BLOCKS)
        big_expected_grad = call(client, client.swarm.backward_span(span, big, big_grad), 30)[0]
        pid = node.actor_pid("frontend.0")
        os.kill(pid, signal.SIGSTOP)
        try:
            waiting = {
                "rpc_forward": background(client, client.swarm.forward_span(span, hidden), 60),
                "rpc_backward": background(client, client.swarm.backward_span(span, hidden, grad_out), 60),
                "rpc_info": background(client, client.swarm.rpc_info(span.peer_id, client.swarm.uid(0, 1)), 60),
                "rpc_forward_stream": background(client, client.swarm.forward_span(span, big), 60),
                "rpc_backward_stream": background(client, client.swarm.backward_span(span, big, big_grad), 60),
            }
            time.sleep(1.5)  # p2pd has handed them to the keeper, and the keeper to the stopped frontend
        finally:
            sigkill(pid)
        t0 = time.monotonic()
        bound = HEARTBEAT_TIMEOUT + recovery_limit()
        assert rel_err(waiting["rpc_forward"].result(timeout=bound + 10), ref) <= TOL
        assert rel_err(waiting["rpc_backward"].result(timeout=bound + 10)[0], expected_grad) <= TOL
        assert waiting["rpc_info"].result(timeout=bound + 10)["version"]
        assert rel_err(waiting["rpc_forward_stream"].result(timeout=bound + 10), big_ref) <= TOL
        assert rel_err(waiting["rpc_backward_stream"].result(timeout=bound + 10)[0], big_expected_grad) <= TOL
        answered_after = time.monotonic() - t0
        assert answered_after < bound, f"answered {answered_after:.1f} s after the frontend died"
        node.wait_ready("frontend.0", pid, timeout=30)
        check_serves(client, node, sample)
        events = [e for e in node.log_events() if e.get("event") == "call sent again"]
        assert {e["rpc"] for e in events} >= set(waiting), events


def metric_values(node: NodeProcess, *names: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.status['metrics_port']}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = {}
    for name in names:
        match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        found[name] = float(match.group(1)) if match else None
    return found


def test_a_unary_call_whose_caller_left_stops_in_the_node(tmp_path_factory, swarm, client, sample):
    """The keeper holds unary calls: when a caller gives up on one (p2pd cancels it), the frontend that holds
    it stops its work, as hivemind cancelled the frontend's own handler before. The runtime is stopped (no
    heartbeat kill for 30 s), so the forward waits on it; the caller leaves after 1 s; the node then holds
    no call and handles no request, while the runtime is still stopped. Resumed, the node serves."""
    node = start_node(tmp_path_factory, swarm, "--heartbeat_timeout", "30", "--metrics_port", "0")
    names = ("node_requests_in_flight", "node_calls_held")
    try:
        hidden, _ = sample
        check_serves(client, node, sample)
        runtime = node.actor_pid("runtime.0")
        os.kill(runtime, signal.SIGSTOP)
        try:
            with pytest.raises((asyncio.TimeoutError, TimeoutError)):
                call(client, client.swarm.forward_span(span_of(node), hidden), 1.0)
            wait_until(
                lambda: metric_values(node, *names) == dict.fromkeys(names, 0.0),
                timeout=10,
                what="the call left by its caller, ended in the keeper and the frontend",
                node=node,
            )
            assert psutil.Process(runtime).status() == psutil.STATUS_STOPPED  # nothing else ended it
        finally:
            signal_if_stopped(runtime, signal.SIGCONT)
        check_serves(client, node, sample)
        assert node.actor_pid("runtime.0") == runtime
    finally:
        node.stop()


# --- a frontend dies during an inference session ---------------------------------------------


@pytest.fixture(scope="class")
def two_frontends(tmp_path_factory, swarm):
    """A node with two frontends; the supervisor kill -9 test ends it."""
    node = start_node(tmp_path_factory, swarm, "--num_handlers", "2")
    yield node
    node.stop(signal.SIGKILL)


class TestTwoFrontends:
    """A frontend dies, the other serves; then the supervisor is killed with -9."""

    def test_frontend_kill9_during_session(self, two_frontends, client, sample):
        """Two frontends: the session's owner dies with -9 between two steps and again with a step in
        flight; the stream keeper hands the stream to the other frontend each time, which reopens the
        session and rebuilds its cache, and the client's steps get transformers' outputs: one stream and
        one session id from start to end. The dead owner's grants are freed; the survivor serves meanwhile."""
        node = two_frontends
        hidden, ref = sample
        peer = node.peer_id
        span = span_of(node)
        uid = f"{PREFIX}.0"
        full = client.rpc_info(peer, uid)["cache_tokens_available"]
        session = client.session(64, 0, NUM_BLOCKS, route=[span])
        session.__enter__()
        restarts = {}
        try:
            assert rel_err(session.step(hidden[:, :3]), ref[:, :3]) <= TOL
            assert client.rpc_info(peer, uid)["cache_tokens_available"] < full
            session_id = session.session.sessions[0].session_id

            def owner() -> str:
                opened = [
                    e
                    for e in node.log_events()
                    if e.get("event") == "session opened" and e.get("session") == session_id
                ]
                return opened[-1]["actor"]

            first = owner()
            restarts[first] = (node.status["actors"][first]["restarts"], node.actor_pid(first))
            t0 = time.monotonic()
            os.kill(node.actor_pid(first), signal.SIGKILL)  # between two steps
            wait_until(
                lambda: [e for e in node.log_events() if e.get("event") == "stream handed over"],
                ERROR_LIMIT,
                "the keeper did not hand the stream over",
                node,
            )
            assert rel_err(call(client, session.session.step(hidden[:, 3:5]), ERROR_LIMIT), ref[:, 3:5]) <= TOL
            handed_over = time.monotonic() - t0
            second = owner()
            assert second != first
            pid = node.actor_pid(second)
            restarts[second] = (node.status["actors"][second]["restarts"], pid)
            os.kill(pid, signal.SIGSTOP)  # the next step reaches it, then it dies with the step in flight
            step = background(client, session.session.step(hidden[:, 5:]), ERROR_LIMIT + 30)
            time.sleep(0.5)
            sigkill(pid)
            assert rel_err(step.result(timeout=ERROR_LIMIT + 30), ref[:, 5:]) <= TOL
            opened = {e["session"] for e in node.log_events() if e.get("event") == "session opened"}
            assert session_id in opened
            handovers = [e for e in node.log_events() if e.get("event") == "stream handed over"]
            assert len(handovers) >= 2
        finally:
            try:
                session.__exit__(None, None, None)
            except Exception:
                pass
        wait_until(
            lambda: cache_available(client, peer, uid) == full,
            ERROR_LIMIT,
            "the dead frontends' and the closed session's cache was not freed",
            node,
        )
        for name, (count, pid) in restarts.items():
            node.wait_ready(name, pid, timeout=30)
            assert node.status["actors"][name]["restarts"] == count + 1
        print(f"\nfrontend kill -9: the session's next step answered {handed_over:.2f} s after the kill")
        for _ in range(6):  # p2pd balances over both frontends again; none of it goes to the dead one
            check_serves(client, node, sample)

    def test_supervisor_kill9_leaves_nothing(self, two_frontends):
        node = two_frontends
        pids = node.all_pids()
        assert len(pids) >= 7  # supervisor, p2pd and 5 actors
        assert p2pd_of(node.run_dir)
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        t0 = time.monotonic()
        assert_nothing_left(node, pids, timeout=5)
        print(f"\nsupervisor kill -9: everything gone after {time.monotonic() - t0:.2f} s")


# --- restart intensity -------------------------------------------------------------------------


def test_too_many_restarts_offline_and_exit_nonzero(tmp_path_factory, swarm, client):
    node = start_node(tmp_path_factory, swarm, "--max_restarts", "2", "--restart_window", "60")
    try:
        peer = node.peer_id
        pids = node.all_pids()
        for _ in range(2):
            pid = node.actor_pid("allocator")
            os.kill(pid, signal.SIGKILL)
            node.wait_ready("allocator", pid, timeout=30)
        assert node.status["actors"]["allocator"]["restarts"] == 2
        os.kill(node.actor_pid("allocator"), signal.SIGKILL)  # the third restart in 60 s is one too many
        code = node.proc.wait(30)
        assert code != 0
        events = node.log_events()
        assert any(e.get("event") == "too many restarts; giving up" for e in events)
        assert offline_announced(node), node.log_tail(30)
        info, _ = record(client, peer)
        assert info is not None and info.state == ServerState.OFFLINE
        assert node.status["state"] == "stopped"
        assert_nothing_left(node, pids)
    finally:
        node.stop(signal.SIGKILL)


# --- graceful shutdown ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sig, runtime_hangs",
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGTERM-work-finishes", "SIGINT-work-fails"],
)
def test_shutdown_signal(sig, runtime_hangs, tmp_path_factory, swarm, client, sample):
    """A forward and an inference step are in flight (waiting on a stopped runtime) when the signal
    comes. SIGTERM case: the runtime resumes and both finish. SIGINT case: the runtime stays stopped,
    both fail once the grace period is over. Either way: OFFLINE, exit 0, nothing left."""
    grace = 3.0
    hidden, ref = sample
    node = start_node(tmp_path_factory, swarm, "--shutdown_grace", str(grace))
    session = None
    try:
        peer = node.peer_id
        span = span_of(node)
        session = client.session(64, 0, NUM_BLOCKS, route=[span])
        session.__enter__()
        assert rel_err(session.step(hidden[:, :4]), ref[:, :4]) <= TOL
        pids = node.all_pids()
        runtime = node.actor_pid("runtime.0")
        os.kill(runtime, signal.SIGSTOP)
        try:
            forward = background(client, client.swarm.forward_span(span, hidden), 60)
            step = background(client, session.session.step(hidden[:, 4:]), 60)
            time.sleep(1.0)
            assert not forward.done() and not step.done()
            t0 = time.monotonic()
            node.proc.send_signal(sig)
            if not runtime_hangs:
                time.sleep(0.5)
                os.kill(runtime, signal.SIGCONT)  # the runtime resumes during the frontends' grace period
            bound = grace + ERROR_LIMIT
            if runtime_hangs:  # failed by the frontends once their grace period is over
                for future in (forward, step):
                    with pytest.raises(Exception) as failure:
                        future.result(timeout=max(0.1, t0 + bound - time.monotonic()))
                    assert not isinstance(failure.value, (asyncio.TimeoutError, TimeoutError)), "in-flight work hung"
                    assert "shutting down" in str(failure.value), repr(failure.value)
            else:
                assert rel_err(forward.result(timeout=bound), ref) <= TOL
                assert rel_err(step.result(timeout=bound), ref[:, 4:]) <= TOL
            settled = time.monotonic() - t0
            code = node.proc.wait(30)
        finally:
            signal_if_stopped(runtime, signal.SIGCONT)
        stopped = time.monotonic() - t0
        assert code == 0, node.log_tail(40)
        assert offline_announced(node), node.log_tail(40)
        info, _ = record(client, peer)
        assert info is not None and info.state == ServerState.OFFLINE
        assert node.status["state"] == "stopped"
        assert_nothing_left(node, pids)
        with pytest.raises(Exception):  # the session ended with the node
            call(client, session.session.step(hidden[:, 5:]), ERROR_LIMIT)
        print(
            f"\n{signal.Signals(sig).name}: in-flight work settled after {settled:.1f} s, "
            f"node exited after {stopped:.1f} s"
        )
        assert settled < bound
    finally:
        try:
            if session is not None:
                session.__exit__(None, None, None)
        except Exception:
            pass
        node.stop(signal.SIGKILL)


# --- a graceful stop drains (issue 21) ---------------------------------------------------------


def session_at(client: Client, node, hidden, first: int = 4):
    """A session open on the node, its first `first` tokens stepped."""
    session = client.session(hidden.shape[1] + 8, 0, NUM_BLOCKS, route=[span_of(node)])
    session.__enter__()
    return session, session.step(hidden[:, :first])


def close_quietly(session) -> None:
    """Close a session whose node may be gone (its close then fails: nothing to do about it)."""
    if session is not None:
        try:
            session.__exit__(None, None, None)
        except Exception:
            pass


def events(node, name: str) -> list[dict]:
    return [e for e in node.log_events() if e.get("event") == name]


def test_a_stop_serves_open_sessions_until_their_clients_close_them(tmp_path_factory, swarm, client, sample):
    hidden, ref = sample
    node = start_node(tmp_path_factory, swarm, "--shutdown_grace", "60")
    try:
        peer = node.peer_id
        session, first = session_at(client, node, hidden)
        assert rel_err(first, ref[:, :4]) <= TOL
        t0 = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: node.status.get("state") == "draining", 10, "status.json saying draining", node)

        def offline() -> bool:
            info, _ = record(client, peer)
            return info is not None and info.state == ServerState.OFFLINE

        wait_until(offline, 10, "the node announced OFFLINE", node)
        with pytest.raises(Exception, match="shutting down"):  # a new session: the client goes elsewhere
            call(client, client.swarm.forward_span(span_of(node), hidden), 10)
        other = client.session(8, 0, NUM_BLOCKS, route=[span_of(node)])
        with pytest.raises(Exception, match="shutting down"):
            with other:
                other.step(hidden[:, :2])
        # the open session goes on as if nothing happened, on the same cache
        assert rel_err(session.step(hidden[:, 4:5]), ref[:, 4:5]) <= TOL
        assert rel_err(session.step(hidden[:, 5:]), ref[:, 5:]) <= TOL
        wait_until(lambda: any(e.get("sessions") == 1 for e in events(node, "draining")), 15, "a drain log", node)
        assert node.proc.poll() is None, "the node waits for its open session"
        closed = time.monotonic()
        session.__exit__(None, None, None)
        code = node.proc.wait(30)
        stopped = time.monotonic()
        assert code == 0, node.log_tail(40)
        assert stopped - closed < 30, f"the node took {stopped - closed:.1f} s to stop once its last session closed"
        assert events(node, "drained"), node.log_tail(40)
        print(
            f"\ndrain with one open session: it was served {closed - t0:.1f} s after SIGTERM, "
            f"and the node stopped {stopped - closed:.1f} s after the session closed"
        )
    finally:
        node.stop(signal.SIGKILL)


def test_a_frontend_killed_during_a_stop_is_replaced_and_its_session_goes_on(tmp_path_factory, swarm, client, sample):
    """The drain serves an open session; its frontend dies of something else meanwhile (kill -9): it is
    replaced as at any time (the keeper hands the session's stream to the successor, which drains in its
    place), the session's next steps are the same tokens, and the node stops once the client closes it."""
    hidden, ref = sample
    node = start_node(tmp_path_factory, swarm, "--shutdown_grace", "60")
    try:
        session, first = session_at(client, node, hidden)
        assert rel_err(first, ref[:, :4]) <= TOL
        node.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: node.status.get("state") == "draining", 10, "status.json saying draining", node)
        old = node.actor_pid("frontend.0")
        os.kill(old, signal.SIGKILL)
        node.wait_ready("frontend.0", old_pid=old, timeout=60)
        assert rel_err(session.step(hidden[:, 4:5]), ref[:, 4:5]) <= TOL
        assert rel_err(session.step(hidden[:, 5:]), ref[:, 5:]) <= TOL
        assert node.proc.poll() is None, "the node waits for its open session"
        session.__exit__(None, None, None)
        assert node.proc.wait(30) == 0, node.log_tail(40)
    finally:
        node.stop(signal.SIGKILL)


def test_a_second_signal_stops_at_once(tmp_path_factory, swarm, client, sample):
    hidden, ref = sample
    node = start_node(tmp_path_factory, swarm, "--shutdown_grace", "120")
    session = None
    try:
        session, _ = session_at(client, node, hidden)
        node.proc.send_signal(signal.SIGINT)
        wait_until(lambda: node.status.get("state") == "draining", 10, "status.json saying draining", node)
        t0 = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        code = node.proc.wait(30)
        assert code == 0 and time.monotonic() - t0 < 20, node.log_tail(40)
        with pytest.raises(Exception):
            session.step(hidden[:, 4:5])
    finally:
        node.stop(signal.SIGKILL)
        close_quietly(session)


def test_a_session_open_when_the_grace_ends_is_told_so(tmp_path_factory, swarm, client, sample):
    hidden, ref = sample
    node = start_node(tmp_path_factory, swarm, "--shutdown_grace", "3")
    session = None
    try:
        session, _ = session_at(client, node, hidden)
        t0 = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        code = node.proc.wait(30)
        assert code == 0, node.log_tail(40)
        assert 3 <= time.monotonic() - t0 < 20
        with pytest.raises(Exception) as ended:
            session.step(hidden[:, 4:5])
        assert "shutting down" in str(ended.value) and "--shutdown_grace of 3 s" in str(ended.value), repr(ended.value)
    finally:
        node.stop(signal.SIGKILL)
        close_quietly(session)
