"""What a session has sent, kept by its frontend so that a new runtime can rebuild its attention cache.

A runtime that is replaced (a crash, a hung process killed, a tensor-parallel group restarted, a reload)
takes the sessions' caches with it. The frontend keeps, for each open session, the block inputs it has
received per position, with hypo_ids reorderings and rollbacks applied as the runtime applies them to
the cache, and its deep prompts: one prefill of that history on the new runtime gives the cache the same
contents (DESIGN section 4). Host memory, bounded by the session's max_length: batch x max_length x
hidden_size values, against the cache's 2 x kv heads x head_dim values per block for every token.

Raw bytes (numpy views, no torch): the frontend does not compute, it only keeps and replays.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from protocol.wire import ITEMSIZE, RawTensor


class HistoryLost(Exception):
    """The session's history cannot be kept (its inputs changed dtype); it cannot be rebuilt."""


class History:
    def __init__(self, batch: int, max_length: int, hidden_size: int):
        self.batch, self.max_length, self.hidden_size = batch, max_length, hidden_size
        self.dtype: Optional[str] = None
        self.hidden: Optional[np.ndarray] = None  # [batch, max_length, hidden_size * itemsize] bytes
        self.prompts: Optional[np.ndarray] = None  # [n_blocks, batch, max_length, hidden_size * itemsize]
        self.length = 0  # positions [0, length) are held
        self.lost: Optional[str] = None  # why it cannot be rebuilt, once it cannot

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.hidden, self.prompts) if a is not None)

    def _rows(self, raw: RawTensor) -> np.ndarray:
        """A [B, T, H] tensor's bytes as [B, T, H * itemsize] (a view, no copy)."""
        b, t = raw.shape[0], raw.shape[1]
        return np.frombuffer(raw.data, dtype=np.uint8).reshape(b, t, -1)

    def record(self, position: int, hidden: RawTensor, prompts: Optional[RawTensor], hypo_ids: Optional[RawTensor]):
        """A step the runtime has just done: reorder by hypo_ids, forget what came after `position`, keep the
        step's inputs at [position, position + length)."""
        if self.lost is not None:
            return
        if self.dtype is None:
            self.dtype = hidden.dtype
            width = self.hidden_size * ITEMSIZE[hidden.dtype]
            self.hidden = np.zeros((self.batch, self.max_length, width), dtype=np.uint8)
        elif hidden.dtype != self.dtype or (prompts is not None and prompts.dtype != self.dtype):
            self.forget(f"its steps changed dtype from {self.dtype} to {hidden.dtype}")
            return
        if hypo_ids is not None:
            order = np.frombuffer(hypo_ids.data, dtype="<i8")
            self.hidden[:, : self.length] = self.hidden[order, : self.length]
            if self.prompts is not None:
                self.prompts[:, :, : self.length] = self.prompts[:, order, : self.length]
        length = hidden.shape[1]
        self.hidden[:, position : position + length] = self._rows(hidden)
        if self.prompts is not None or prompts is not None:
            self._record_prompts(position, length, prompts)
        self.length = position + length

    def _record_prompts(self, position: int, length: int, prompts: Optional[RawTensor]) -> None:
        """A step's prompts cover its first P positions; the other positions get zeros (adding zero
        changes nothing, so one prefill with these prompts computes what the steps computed)."""
        if self.prompts is None:
            self.prompts = np.zeros((prompts.shape[0],) + self.hidden.shape, dtype=np.uint8)
        p = 0
        if prompts is not None:
            n_blocks, rows, p = prompts.shape[0], prompts.shape[1], prompts.shape[2]
            values = np.frombuffer(prompts.data, dtype=np.uint8).reshape(n_blocks, rows, p, -1)
            self.prompts[:, :, position : position + p] = values  # a batch-1 prompt applies to every row
        self.prompts[:, :, position + p : position + length] = 0

    def forget(self, why: str) -> None:
        self.lost = why
        self.hidden = self.prompts = None

    def replay(self) -> tuple[RawTensor, Optional[RawTensor]]:
        """(hidden states, deep prompts or None) of positions [0, length): one prefill rebuilds the cache."""
        if self.lost is not None:
            raise HistoryLost(f"its history is not held: {self.lost}")
        shape = (self.batch, self.length, self.hidden_size)
        hidden = RawTensor(self.dtype, shape, np.ascontiguousarray(self.hidden[:, : self.length]).reshape(-1))
        prompts = None
        if self.prompts is not None:
            n_blocks = self.prompts.shape[0]
            data = np.ascontiguousarray(self.prompts[:, :, : self.length]).reshape(-1)
            prompts = RawTensor(self.dtype, (n_blocks, self.batch, self.length, self.hidden_size), data)
        return hidden, prompts
