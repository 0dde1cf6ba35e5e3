"""Watch a running node from the inside: every actor's message headers and stats, live.

    python -m node.probe RUN_DIR [--actor NAME ...] [--type TYPE ...] [--session ID] [--json]
                                 [--no-stats] [--duration SECONDS] [--count N]
    python -m node.probe RUN_DIR --stats [--actor NAME ...] [--once]  # a live table of every actor's stats
    python -m node.probe RUN_DIR --follow SESSION              # one session's steps, timed across actors

Every actor binds an XPUB socket at RUN_DIR/probe.<actor>.sock and publishes, only while someone
subscribes, a ProbeEvent for each message it sends ("out") or receives ("in") on its data sockets
and its stats ("stats") about once a second. This command subscribes to them (re-scanning RUN_DIR
every second, so actors that start later or restart are picked up) and prints one line per event:

    14:02:11.532 runtime.0    in    InferStep  session=1b9e3c2a req=7 handle=3 start=0 end=4 ...

Filters: --actor takes exact names or prefixes ("frontend" is every frontend); --type exact
message type names ("Stats" selects stats); --session a session id or a prefix of one. Replies
(Result, Granted, Failure) carry no session: they are matched to the request with the same req on
the same actor (and, on a ROUTER, the same peer actor), and Release/DropCache to the session whose
cache handle they free. Stats events are shown unless --session, --type or --no-stats asks
otherwise. --json prints one JSON object per event. Progress and attach notices ("attached to
runtime.0") go to stderr, so stdout holds events only.

--stats replaces the event stream by a table of each actor's latest stats (with its pid and restart
count from status.json), redrawn every second (--count N: N tables; --once: one). --follow SESSION
prints, for each step of that session (a session id or a prefix of one), where its time went:

    step 3 req=7 handle=3 tokens=1: keeper 0.42 ms, frontend 0.31 ms, to runtime 0.21 ms,
        queued 0.05 ms, compute 5.35 ms, back 0.18 ms, reply 0.04 ms, to client 0.35 ms, total 6.91 ms

keeper: from the stream keeper reading the client's message to the session taking it as a step (the
ZeroMQ hop to the frontend, hivemind's framing, the protobuf, the session's queue); frontend: from
there to its InferStep leaving for the runtime (checks); to runtime / back: the ZeroMQ hops; queued: in
the runtime's queue until a compute round took it (admission, waiting for the round under way, or for
the other sessions of the round); compute: that round (or rounds, for a long prefill) until its Result
left; reply: until the frontend had the answer (the history, encoding); to client: until the keeper
wrote it to the client's stream. A step pushed by another server (rpc_push) has no keeper parts. With
--json each step is one object with the raw timestamps.

Exit status: 0 when --duration or --count is reached, on Ctrl-C or when the node stops; 2 when
RUN_DIR holds no node (no status.json, or no probe socket matches --actor).

The probe imports neither torch nor hivemind so that it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any, Optional

import msgspec
import zmq

from node.supervisor.status_view import figures
from protocol.messages import ProbeEvent

PROG = "python -m node.probe"
RESCAN_SECONDS = 1.0

# Which requests a reply can answer, by the requester's socket: a frontend numbers its runtime
# requests and its allocator requests separately, so "req 3" alone does not name one request.
REQUEST_FAMILY = {"InferStep": "runtime", "Allocate": "allocator"}  # the requests that name a session
REPLY_FAMILIES = {"Result": ("runtime",), "Granted": ("allocator",), "Failure": ("runtime", "allocator")}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description="Print a running node's internal messages and stats live.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the node's run directory (--run_dir of the supervisor)")
    p.add_argument("--actor", action="append", default=[], metavar="NAME", help="actor name or prefix (repeatable)")
    p.add_argument(
        "--type",
        action="append",
        default=[],
        metavar="TYPE",
        dest="types",
        help="message type, e.g. InferStep (repeatable)",
    )
    p.add_argument("--session", metavar="ID", default="", help="session id (or a prefix of one)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--no-stats", dest="no_stats", action="store_true", help="leave out the actors' periodic stats events"
    )
    p.add_argument(
        "--stats", dest="table", action="store_true", help="a live table of every actor's stats instead of events"
    )
    p.add_argument("--follow", metavar="SESSION", default="", help="time each step of one session across actors")
    p.add_argument("--duration", type=float, default=None, metavar="SECONDS", help="exit after this many seconds")
    p.add_argument(
        "--count", type=int, default=None, metavar="N", help="exit after printing N events (--stats: N tables)"
    )
    p.add_argument("--once", action="store_true", help="print one table (--stats) or one event, then exit (--count 1)")
    args = p.parse_args(argv)
    if args.once:
        args.count = 1
    args.stats = (
        not args.no_stats and not args.session and not args.follow and (not args.types or "Stats" in args.types)
    )
    return args


def fail(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.exit(2)


def note(message: str) -> None:
    sys.stderr.write(f"probe: {message}\n")
    sys.stderr.flush()


def read_status(run_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(run_dir, "status.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def probe_sockets(run_dir: str, prefixes: list[str]) -> dict[str, str]:
    """{actor name: socket path} for the probe sockets in RUN_DIR whose actor matches --actor."""
    found = {}
    try:
        entries = os.listdir(run_dir)
    except OSError:
        return found
    for entry in entries:
        if entry.startswith("probe.") and entry.endswith(".sock"):
            name = entry[len("probe.") : -len(".sock")]
            if not prefixes or any(name.startswith(p) for p in prefixes):
                found[name] = os.path.join(run_dir, entry)
    return found


class SessionTracker:
    """Attributes replies to the session of the request they answer (matched by actor and req), and
    cache releases (Release, DropCache) to the session that held the cache handle."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str, str, int], str] = {}
        self._handles: dict[int, str] = {}

    def session_of(self, event: ProbeEvent) -> str:
        session = event.session
        peer = event.fields.get("peer_actor", "")  # on a ROUTER: which frontend's numbering `req` is in
        if session:
            family = REQUEST_FAMILY.get(event.type)
            if family and event.req >= 0:
                self._open[(event.actor, peer, family, event.req)] = session
        else:
            for family in REPLY_FAMILIES.get(event.type, ()):
                session = self._open.pop((event.actor, peer, family, event.req), "")
                if session:
                    break
        handles = event.fields.get("handles") or [event.fields.get("handle")]
        if session and isinstance(handles[0], int):
            self._handles[handles[0]] = session
        elif not session:
            session = next((self._handles[h] for h in handles if h in self._handles), "")
        if len(self._open) + len(self._handles) > 100_000:  # replies or releases we never saw: forget
            self._open.clear()
            self._handles.clear()
        return session


def _tensor(meta: Any) -> str:
    # TensorMeta travels as [dtype, shape]
    if isinstance(meta, (list, tuple)) and len(meta) == 2 and isinstance(meta[0], str):
        return f"{meta[0]}[{','.join(str(d) for d in meta[1])}]"
    return str(meta)


def _value(key: str, value: Any) -> str:
    if key == "tensors" and isinstance(value, list):
        return "[" + ", ".join(_tensor(m) for m in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"), default=str)
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def human_line(event: ProbeEvent, session: str) -> str:
    clock = datetime.datetime.fromtimestamp(event.t).strftime("%H:%M:%S.%f")[:-3]
    head = f"{clock} {event.actor:<12} {event.dir:<5} {event.type:<10}"
    parts = []
    if session:
        parts.append(f"session={session[:8]}")
    if event.req >= 0:
        parts.append(f"req={event.req}")
    parts += [f"{k}={_value(k, v)}" for k, v in event.fields.items() if k not in ("session", "req")]
    return f"{head} {' '.join(parts)}".rstrip()


def json_line(event: ProbeEvent, session: str) -> str:
    record = msgspec.structs.asdict(event)
    record["session"] = session
    return msgspec.json.encode(record).decode()


class StatsTable:
    """The latest stats of each actor, printed as one table."""

    def __init__(self) -> None:
        self.latest: dict[str, dict] = {}

    def update(self, event: ProbeEvent) -> None:
        self.latest[event.actor] = event.fields

    def render(self, status: Optional[dict] = None) -> str:
        """One line for the node (from status.json), one per actor: pid and restarts (the supervisor's
        table), then the actor's own scalar stats."""
        status = status or {}
        blocks = status.get("blocks") or ["?", "?"]
        lines = [
            time.strftime("%H:%M:%S")
            + f"  node {status.get('state', '?')}  blocks {blocks[0]}:{blocks[1]}  {len(self.latest)} actors"
        ]
        table = status.get("actors", {})
        for actor in sorted(self.latest):
            info = table.get(actor, {})
            cells = [f"pid={info.get('pid', '?')}", f"restarts={info.get('restarts', '?')}"]
            # the same figures as the status page's actor rows (node/supervisor/status_view.py)
            cells += [f"{k}={_value(k, v)}" for k, v in figures(self.latest[actor]).items()]
            lines.append(f"{actor:<12} " + " ".join(cells))
        return "\n".join(lines)


class StepTimer:
    """Times one session's steps across actors, from these events:

    keeper    in  ClientMessage the client's message read from its stream (stream, message: its number)
    frontend  in  ClientStep    the step taken from the client's stream (or an rpc_push); a client's own
                                step names its stream and message, as the keeper does
    frontend  out InferStep     sent to the runtime (req numbers the frontend's runtime requests)
    runtime   in  InferStep     received by the runtime (peer_actor: which frontend)
    runtime   run Round         a compute round began with this step in it (the first one counts)
    runtime   out Result        computed (or Failure)
    frontend  in  Result        the answer back in the frontend
    frontend  out ClientReply   handed to the client's stream (or ClientError: the session ends)
    keeper    out ClientFrame   the reply written to the client's stream (handled: the message it answers)

    Steps are keyed by (frontend, session) until the InferStep gives them a req, then by (frontend,
    req), which is how the runtime's events name them. Each actor publishes on its own socket, so
    the runtime's events of a step may reach us after the frontend's reply to it (or before the
    frontend's InferStep): the runtime's marks are kept by (frontend, req) on their own, and a
    finished step waits up to GRACE seconds for them before it is printed, steps in order. The keeper's
    marks likewise, by (stream, message); a pushed step has none.
    """

    MARKS = ("read", "received", "sent", "taken", "started", "finished", "back", "replied", "written")
    RUNTIME_MARKS = ("taken", "started", "finished")
    KEEPER_MARKS = ("read", "written")
    # (label, from, to): the intervals of one printed line
    PARTS = (
        ("keeper", "read", "received"),
        ("frontend", "received", "sent"),
        ("to runtime", "sent", "taken"),
        ("queued", "taken", "started"),
        ("compute", "started", "finished"),
        ("back", "finished", "back"),
        ("reply", "back", "replied"),
        ("to client", "replied", "written"),
    )
    GRACE = 1.0
    KEEP = 4096  # runtime marks of requests not (or no longer) ours, kept for a late frontend event

    def __init__(self, session: str, as_json: bool = False) -> None:
        self.session = session
        self.as_json = as_json
        self.pending: dict[tuple[str, str], dict] = {}  # (frontend, session) -> the step under way
        self.by_req: dict[tuple[str, int], dict] = {}  # (frontend, req) -> the step, until its answer is back
        self.runtime: dict[tuple[str, int], dict] = {}  # (frontend, req) -> the runtime's marks, oldest first
        self.keeper: dict[tuple[int, int], dict] = {}  # (stream, message) -> the keeper's marks, oldest first
        self.done: list[tuple[float, dict]] = []  # (print by, step): answered, in the order answered
        self.count: dict[str, int] = {}  # steps seen per session

    def _step(self, frontend: str, session: str) -> dict:
        step = self.pending.get((frontend, session))
        if step is None:
            self.count[session] = self.count.get(session, 0) + 1
            step = self.pending[(frontend, session)] = {
                "n": self.count[session],
                "session": session,
                "frontend": frontend,
            }
        return step

    def _marks(self, frontend: str, req: int) -> dict:
        return self._bounded_marks(self.runtime, (frontend, req))

    def _bounded_marks(self, table: dict, key: tuple) -> dict:
        marks = table.get(key)
        if marks is None:
            if len(table) >= self.KEEP:
                del table[next(iter(table))]
            marks = table[key] = {}
        return marks

    def feed(self, event: ProbeEvent, session: str, now: float) -> list[str]:
        """Take one event; return the lines of the steps now complete (now: time.monotonic())."""
        ours = bool(session) and session.startswith(self.session)
        if event.actor.startswith("frontend"):
            if event.type == "ClientStep" and ours:
                self.pending.pop((event.actor, session), None)
                step = self._step(event.actor, session)
                step["received"] = event.t
                if "stream" in event.fields and "message" in event.fields:
                    step["kept"] = (event.fields["stream"], event.fields["message"])
            elif event.type == "InferStep" and event.dir == "out" and ours:
                step = self._step(event.actor, session)
                step.update(
                    sent=event.t,
                    req=event.req,
                    handle=event.fields.get("handle"),
                    tokens=_tokens(event.fields.get("tensors")),
                )
                self.by_req[(event.actor, event.req)] = step
            elif event.type in ("Result", "Failure") and event.dir == "in":
                step = self.by_req.pop((event.actor, event.req), None)
                if step is not None:
                    step["back"] = event.t
                    step["failed"] = step.get("failed") or event.type == "Failure"
            elif event.type in ("ClientReply", "ClientError") and ours:
                step = self.pending.pop((event.actor, session), None)
                if step is not None:
                    step["replied"] = event.t
                    step["failed"] = step.get("failed") or event.type == "ClientError"
                    step["error"] = event.fields.get("error", "")
                    step["answered"] = event.fields.get("answered", event.type == "ClientReply")
                    self.by_req.pop((event.actor, step.get("req")), None)
                    self.done.append((now + self.GRACE, step))
        elif event.actor.startswith("runtime"):
            if event.type == "Round":
                for peer, req in event.fields.get("steps", ()):
                    self._marks(peer, req).setdefault("started", event.t)
            elif event.dir == "in" and event.type == "InferStep":
                self._marks(event.fields.get("peer_actor", ""), event.req)["taken"] = event.t
            elif event.dir == "out" and event.type in ("Result", "Failure"):
                self._marks(event.fields.get("peer_actor", ""), event.req)["finished"] = event.t
        elif event.actor.startswith("keeper"):
            stream = event.fields.get("stream")
            if event.type == "ClientMessage":
                self._bounded_marks(self.keeper, (stream, event.fields.get("message")))["read"] = event.t
            elif event.type == "ClientFrame":  # the first frame of the reply to that message
                self._bounded_marks(self.keeper, (stream, event.fields.get("handled"))).setdefault("written", event.t)
        return self.due(now)

    def due(self, now: float) -> list[str]:
        """The lines of the answered steps whose runtime marks are all in, or that waited long enough."""
        lines = []
        while self.done:
            print_by, step = self.done[0]
            marks = self.runtime.get((step["frontend"], step.get("req")), {}) if "sent" in step else None
            if marks is not None and now < print_by and not all(m in marks for m in self.RUNTIME_MARKS):
                break
            kept = self.keeper.get(step["kept"], {}) if "kept" in step else None
            if kept is not None and now < print_by and not all(m in kept for m in self.KEEPER_MARKS):
                break
            self.done.pop(0)
            if marks:
                step.update(marks)
                del self.runtime[(step["frontend"], step["req"])]
            if kept:
                step.update(kept)
                del self.keeper[step["kept"]]
            lines.append(self.render(step))
        return lines

    def next_due(self) -> float:
        return self.done[0][0] if self.done else float("inf")

    def render(self, step: dict) -> str:
        def ms(a: str, b: str) -> Optional[float]:
            return round(1000 * (step[b] - step[a]), 3) if a in step and b in step else None

        # the keeper's two parts only for a step from the keeper's stream (not a push)
        parts = {
            label: ms(a, b)
            for label, a, b in self.PARTS
            if "kept" in step or (a not in self.KEEPER_MARKS and b not in self.KEEPER_MARKS)
        }
        total = ms("read" if "read" in step else "received", "written" if "written" in step else "replied")
        if self.as_json:
            record = {k: step.get(k) for k in ("session", "n", "req", "handle", "tokens", "failed", "error")}
            record.update({k: step[k] for k in self.MARKS if k in step}, ms={**parts, "total": total})
            return json.dumps(record)
        if "sent" not in step:
            why = (
                f"FAILED: {step['error']}" if step.get("failed") else "answered without the runtime (a step sent twice)"
            )
            return f"step {step['n']} session={step['session'][:8]}: {why}, total {_ms(total)}"
        outcome = " FAILED" if step.get("failed") else ""
        timings = ", ".join(f"{label} {_ms(v)}" for label, v in parts.items())
        return (
            f"step {step['n']} req={step['req']} handle={step['handle']} tokens={step['tokens']}{outcome}: "
            f"{timings}, total {_ms(total)}"
        )


def _ms(value: Optional[float]) -> str:
    return "?" if value is None else f"{value:.2f} ms"


def _tokens(tensors: Any) -> Any:
    try:
        return tensors[0][1][1]  # hidden_states [batch, tokens, hidden]
    except (TypeError, IndexError):
        return "?"


def run(args: argparse.Namespace) -> int:
    run_dir = os.path.abspath(args.run_dir)
    status = read_status(run_dir)
    if status is None:
        fail(f"{run_dir} has no readable status.json: no node runs there")
    if status.get("state") == "stopped":
        fail(f"the node in {run_dir} is stopped")
    sockets = probe_sockets(run_dir, args.actor)
    if not sockets:
        wanted = f" for --actor {' '.join(args.actor)}" if args.actor else ""
        fail(f"no probe sockets{wanted} in {run_dir} (actors: {', '.join(sorted(status.get('actors', {}))) or 'none'})")
    note(f"node {status.get('peer_id', '?')} ({status.get('state', '?')}) in {run_dir}")

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    # Subscribe to everything: Stats events tell us when each actor is attached even if they are not
    # printed, and topics match by prefix (a "Capacity" topic would also receive "CapacityQuery").
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    decoder = msgspec.msgpack.Decoder(ProbeEvent)
    tracker = SessionTracker()
    connected: set[str] = set()
    attached: set[str] = set()
    types = set(args.types)
    table = StatsTable() if args.table else None
    timer = StepTimer(args.follow, as_json=args.json) if args.follow else None
    next_table = time.monotonic() + 1.0
    printed = 0

    def enough(lines) -> bool:
        """Print these lines; True once --count lines (or tables) are out."""
        nonlocal printed
        for line in lines:
            print(line, flush=True)
            printed += 1
            if args.count is not None and printed >= args.count:
                return True
        return False

    deadline = time.monotonic() + args.duration if args.duration is not None else float("inf")
    next_scan = 0.0
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                return 0
            if now >= next_scan:
                for name, path in sorted(sockets.items()):
                    if path not in connected:
                        # ZeroMQ reconnects by itself when a restarted actor binds the same path again
                        sub.connect(f"ipc://{path}")
                        connected.add(path)
                        note(f"connecting to {name}")
                next_scan = now + RESCAN_SECONDS
                status = read_status(run_dir)
                if status is not None and status.get("state") == "stopped":
                    note("the node stopped")
                    return 0
                sockets = probe_sockets(run_dir, args.actor)
            if table is not None and now >= next_table and table.latest:
                if sys.stdout.isatty():
                    sys.stdout.write("\x1b[2J\x1b[H")  # redraw in place on a terminal
                next_table = now + 1.0
                if enough([table.render(status) + "\n"]):
                    return 0
            if timer is not None and enough(timer.due(now)):
                return 0
            wake = min(
                next_scan,
                deadline,
                next_table if table is not None else deadline,
                timer.next_due() if timer is not None else deadline,
            )
            if not sub.poll(max(1, int(1000 * wake - 1000 * now))):
                continue
            while True:
                try:
                    topic, payload = sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                except ValueError:
                    continue  # not two frames: not a probe event
                try:
                    event = decoder.decode(payload)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue  # an actor from another version of the node: skip rather than die
                if event.actor not in attached:
                    # the first event proves our subscription reached this actor (ZeroMQ's slow joiner)
                    attached.add(event.actor)
                    note(f"attached to {event.actor}")
                session = tracker.session_of(event)
                if table is not None:
                    if event.dir == "stats":
                        table.update(event)
                    continue
                if timer is not None:
                    if enough(timer.feed(event, session, time.monotonic())):
                        return 0
                    continue
                if event.dir == "stats":
                    if not args.stats:
                        continue
                elif (types and event.type not in types) or not session.startswith(args.session):
                    continue
                if enough([json_line(event, session) if args.json else human_line(event, session)]):
                    return 0
    finally:
        ctx.destroy(linger=0)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    try:
        code = run(args)
    except KeyboardInterrupt:
        code = 0
    except BrokenPipeError:
        # the reader went away (`| head`): silence the final flush of stdout too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
