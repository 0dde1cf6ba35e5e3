"""The stream keeper's calls: which frontend answers each rpc_info, rpc_forward, rpc_backward, rpc_push,
rpc_forward_stream and rpc_backward_stream, and what happens to a call whose frontend dies
(docs/reliability.md, "A frontend's crash").

p2pd delivers a unary call whole through the persistent connection of the process that registered its
handler, and waits for that process's answer; when the process dies, p2pd neither fails the call nor
gives it to another: its caller waits for its own timeout. A stream dies with the process that accepted
it. So the keeper registers these handlers, reads a stream's request whole (a forward or backward
stream is one request in parts: nothing is computed before its last part), and this table relays each
call to a frontend (procs/keeper.py moves the bytes). A call whose frontend dies goes to another
frontend, or to the dead one's replacement: forward, backward and info change nothing in the node, so
asking again is safe, and a session drops a pushed step it has already taken by its step_id (PROTOCOL
3.7), so a push may be delivered twice.

Like node/keeper/table.py, no socket and no clock: told what happened, it answers through
`send(frontend, message, frames)` and through the calls its methods return as ended.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

from node.keeper.table import least_loaded
from protocol.messages import Message, UnaryCall, UnaryCancel, UnaryReply

UNARY = ("rpc_info", "rpc_forward", "rpc_backward", "rpc_push")  # the unary RPCs, held by the keeper
STREAMED = ("rpc_forward_stream", "rpc_backward_stream")  # streams read whole by the keeper, then held as calls

NO_FRONTEND = "no frontend of the node answered this call within {limit:.0f} s; retry later"


@dataclass
class Call:
    id: int
    rpc: str  # e.g. "rpc_forward"
    peer: str
    frames: list[bytes]  # the request (a stream's: its messages), kept until answered (it may be asked again)
    frontend: Optional[str] = None  # who answers it; None while it waits for one
    waiting_since: Optional[float] = None
    response: Optional[list[bytes]] = None  # the answer (a stream's: its messages), once ended ...
    error: Optional[str] = None  # ... or the error the caller gets (repr of what the RPC raised)
    done: bool = False
    sent: int = 0  # how many frontends were asked


class Calls:
    """`frontends()`: the keeper table's frontends by name (node/keeper/table.py Frontend)."""

    def __init__(
        self, send: Callable[[str, Message, list], None], frontends: Callable[[], dict], log, first_id: int = 1
    ):
        self.send = send
        self.frontends = frontends
        self.log = log
        self.calls: dict[int, Call] = {}
        # a replaced keeper starts above its predecessor's numbers (the process passes the time in ns), so
        # that a frontend's late answer to an old call cannot be taken for a new call's
        self._ids = itertools.count(first_id)
        self._turn = itertools.count()
        self.resent = 0  # calls asked again after their frontend died

    def start(self, rpc: str, peer: str, frames: list[bytes], now: float) -> Call:
        call = Call(next(self._ids), rpc, peer, frames, waiting_since=now)
        self.calls[call.id] = call
        self._assign(call)
        return call

    def forget(self, call: Call) -> None:
        """The caller is done with it (answered, or gone): a late answer is dropped, and the frontend that
        holds a call not yet answered stops its work."""
        if not call.done and call.frontend is not None:
            self.send(call.frontend, UnaryCancel(call.id), [])
        call.done = True
        self.calls.pop(call.id, None)

    # --- frontends ---------------------------------------------------------------------------

    def _choose(self) -> Optional[str]:
        """The accepting frontend with the fewest calls (ties in turn); while the node stops, a draining
        one (it refuses new work with the reason, and still takes a push for a session it serves); never a
        retiring one (a reload: its replacement accepts)."""
        frontends = self.frontends().values()
        names = [f.name for f in frontends if f.accepting] or [f.name for f in frontends if f.draining]
        return least_loaded(names, (call.frontend for call in self.calls.values() if not call.done), self._turn)

    def _assign(self, call: Call) -> None:
        frontend = self._choose()
        if frontend is None:
            return
        call.frontend, call.waiting_since = frontend, None
        if call.sent:
            self.resent += 1
            self.log.info("call sent again", call=call.id, rpc=call.rpc, peer=call.peer, frontend=frontend)
        call.sent += 1
        self.send(frontend, UnaryCall(call.id, call.rpc, call.peer), list(call.frames))

    def assign_waiting(self) -> None:
        for call in self.calls.values():
            if call.frontend is None and not call.done:
                self._assign(call)

    def down(self, name: str, now: float) -> None:
        """Frontend `name` died (or was replaced): its calls go to another frontend, or wait for one."""
        for call in self.calls.values():
            if call.frontend == name and not call.done:
                call.frontend, call.waiting_since = None, now
        self.assign_waiting()

    def overdue(self, now: float, limit: float) -> list[Call]:
        """Calls that waited more than `limit` seconds for a frontend end with an error."""
        ended = []
        for call in self.calls.values():
            if call.frontend is None and not call.done and call.waiting_since is not None:
                if now - call.waiting_since > limit:
                    call.error, call.done = NO_FRONTEND.format(limit=limit), True
                    ended.append(call)
        return ended

    def end_all(self, error: str, stream_error: str) -> list[Call]:
        """The keeper stops: every call still open ends with `error` (a stream's: `stream_error`, the text of
        its error frame)."""
        ended = [call for call in self.calls.values() if not call.done]
        for call in ended:
            call.error, call.done = stream_error if call.rpc in STREAMED else error, True
        return ended

    # --- a frontend's answer -------------------------------------------------------------------

    def reply(self, sender: str, msg: UnaryReply, frames: list, now: float = 0.0) -> Optional[Call]:
        """The call a frontend answered, now ended; None for an answer from a frontend that no longer holds
        the call (a late one from a process that was given up on) or to a call already ended, and for a
        call given up by a retiring frontend (`again`): it goes to another, or waits for one."""
        call = self.calls.get(msg.call)
        if call is None or call.done or call.frontend != sender:
            return None
        if msg.again:
            call.frontend, call.waiting_since = None, now
            self._assign(call)
            return None
        if msg.error is not None:
            call.error = msg.error
        else:
            call.response = [bytes(frame) for frame in frames]
        call.done = True
        return call

    def count(self) -> int:
        return sum(not call.done for call in self.calls.values())
