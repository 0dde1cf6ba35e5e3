"""The inference sessions a frontend holds open: every one (to end them on a stop, to tell a new
allocator their grants) and those with a session_id (rpc_push finds them by it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from protocol.messages import Adopt

if TYPE_CHECKING:
    from node.frontend.session import InferenceStream


class OpenSessions:
    def __init__(self):
        self.live: set["InferenceStream"] = set()
        self.by_id: dict[str, "InferenceStream"] = {}

    def opened(self, session: "InferenceStream") -> None:
        self.live.add(session)

    def named(self, session_id: str, session: "InferenceStream") -> None:
        self.by_id[session_id] = session

    def closed(self, session: "InferenceStream", session_id: Optional[str]) -> None:
        self.live.discard(session)
        if session_id and self.by_id.get(session_id) is session:
            del self.by_id[session_id]

    def get(self, session_id: str) -> Optional["InferenceStream"]:
        return self.by_id.get(session_id)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self.by_id

    def __len__(self) -> int:
        return len(self.live)

    def hold(self, handle: int) -> bool:
        """Whether an open session holds the allocator's grant `handle`."""
        return any(session.handle == handle for session in self.live)

    def adopt_messages(self) -> list[Adopt]:
        """The grants our open sessions hold, for an allocator that restarted and lost its books."""
        return [adopt for adopt in (s.adopt_message() for s in list(self.live)) if adopt is not None]

    def abort_all(self, error: Exception) -> None:
        for session in list(self.live):
            session.abort(error)

    def history_bytes(self) -> int:
        return sum(s.history.nbytes for s in self.live if s.history is not None)
