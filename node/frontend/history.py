"""What a session has sent, kept by its frontend so that a new runtime can rebuild its attention cache.

A runtime that is replaced (a crash, a hung process killed, a tensor-parallel group restarted, a reload)
takes the sessions' caches with it. The frontend keeps, for each open session, the block inputs it has
received per position, with hypo_ids reorderings and rollbacks applied as the runtime applies them to
the cache, and its deep prompts: one prefill of that history on the new runtime gives the cache the same
contents (DESIGN section 4).

Kept in the node's dtype, because the runtime casts every input to it before the first block: what the
cache holds depends on the cast values only, so converting here (with the same rounding, to nearest
even) loses nothing and makes the bytes per token fixed: hidden_size x dtype bytes, reserved with the
allocator for batch x max_length tokens when the session opens (node/allocator/budget.py). Deep prompts
are kept beside, only for the positions they were sent for (Petals clients send them with the first step),
and the reservation grows for them before they are kept (`bytes_with`; GrowHistory to the allocator).

Raw bytes (numpy, no torch): the frontend does not compute, it only keeps and replays.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from protocol.wire import ITEMSIZE, RawTensor


class HistoryLost(Exception):
    """The session's history is not held: it cannot be rebuilt."""


def _float32(data, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return np.frombuffer(data, dtype="<f4")
    if dtype == "float16":
        return np.frombuffer(data, dtype="<f2").astype("<f4")
    if dtype == "bfloat16":  # the upper half of a float32
        return (np.frombuffer(data, dtype="<u2").astype("<u4") << 16).view("<f4")
    raise ValueError(f"unsupported dtype {dtype}")


def convert(data, src: str, dst: str) -> np.ndarray:
    """Values of dtype `src` as bytes of dtype `dst`, rounded as torch rounds (to nearest even)."""
    if src == dst:
        return np.frombuffer(data, dtype=np.uint8)
    values = _float32(data, src)
    if dst == "float32":
        return values.view(np.uint8)
    if dst == "float16":
        return values.astype("<f2").view(np.uint8)
    if dst == "bfloat16":
        bits = values.view("<u4").astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype("<u2").view(np.uint8)
    raise ValueError(f"unsupported dtype {dst}")


class History:
    def __init__(self, batch: int, max_length: int, hidden_size: int, dtype: str, reserved: int):
        self.batch, self.max_length, self.hidden_size, self.dtype = batch, max_length, hidden_size, dtype
        self.width = hidden_size * ITEMSIZE[dtype]  # bytes of one hidden state
        self.hidden: Optional[np.ndarray] = None  # [batch, max_length, width] bytes, made on the first step
        self.prompts: list[tuple[int, np.ndarray]] = []  # (first position, [n_blocks, rows, p, width] bytes)
        self.length = 0  # positions [0, length) are held
        self.lost: Optional[str] = None  # why it cannot be rebuilt, once it cannot
        self.reserved = reserved  # bytes the allocator holds for it
        if reserved < batch * max_length * self.width:
            self.lost = "the node's history memory (--history_bytes) was full when the session opened"
            self.reserved = 0

    @property
    def nbytes(self) -> int:
        held = self.hidden.nbytes if self.hidden is not None else 0
        return held + sum(values.nbytes for _, values in self.prompts)

    def bytes_with(self, position: int, prompts: Optional[RawTensor]) -> int:
        """What the history will hold once a step at `position` with these deep prompts is recorded: more
        than `reserved` must be reserved first."""
        kept = sum(v.shape[0] * v.shape[1] * max(0, min(v.shape[2], position - first)) for first, v in self.prompts)
        if prompts is not None:
            kept += prompts.shape[0] * prompts.shape[1] * prompts.shape[2]
        return self.batch * self.max_length * self.width + kept * self.width

    def _bytes(self, raw: RawTensor, rows: int, positions: int) -> np.ndarray:
        """A [.., rows, positions, hidden] tensor in the node's dtype, as [.., rows, positions, width] bytes."""
        data = convert(raw.data, raw.dtype, self.dtype)
        return data.reshape(tuple(raw.shape[:-3]) + (rows, positions, self.width))

    def record(self, position: int, hidden: RawTensor, prompts: Optional[RawTensor], hypo_ids: Optional[RawTensor]):
        """A step the runtime has just done: reorder by hypo_ids, forget what came after `position`, keep the
        step's inputs at [position, position + length)."""
        if self.lost is not None:
            self.length = position + hidden.shape[1]  # what a new runtime would be missing
            return
        if self.hidden is None:
            self.hidden = np.zeros((self.batch, self.max_length, self.width), dtype=np.uint8)
        if hypo_ids is not None:
            order = np.frombuffer(hypo_ids.data, dtype="<i8")
            self.hidden[:, : self.length] = self.hidden[order, : self.length]
            self.prompts = [(p, v[:, order] if v.shape[1] == self.batch else v) for p, v in self.prompts]
        length = hidden.shape[1]
        self.hidden[:, position : position + length] = self._bytes(hidden, hidden.shape[0], length)
        self._record_prompts(position, prompts)
        self.length = position + length

    def _record_prompts(self, position: int, prompts: Optional[RawTensor]) -> None:
        """Prompts sent at or after `position` are rolled back with the positions; a step's own prompts
        cover its first P positions (adding zero to the others changes nothing)."""
        kept = []
        for first, values in self.prompts:
            if first + values.shape[2] <= position:
                kept.append((first, values))
            elif first < position:  # a copy, so that the rolled-back positions' bytes go
                kept.append((first, values[:, :, : position - first].copy()))
        if prompts is not None:
            n_blocks, rows, p = prompts.shape[0], prompts.shape[1], prompts.shape[2]
            kept.append((position, self._bytes(prompts, rows, p).reshape(n_blocks, rows, p, self.width).copy()))
        self.prompts = kept

    def forget(self, why: str) -> None:
        self.lost = why
        self.hidden, self.prompts, self.reserved = None, [], 0

    def replay_with(self, position: int, hidden: RawTensor) -> Optional[RawTensor]:
        """The history followed by a step's hidden states, for one prefill that rebuilds the cache and runs
        the step (its output: the last positions). None where the step cannot go with the rebuild: it
        rolls back (position before the end), deep prompts are held, or the history is lost or empty."""
        if self.lost is not None or self.prompts or self.length == 0 or position != self.length:
            return None
        if len(hidden.shape) != 3 or hidden.shape[0] != self.batch or hidden.shape[2] != self.hidden_size:
            return None
        length = hidden.shape[1]
        both = np.empty((self.batch, self.length + length, self.width), dtype=np.uint8)
        both[:, : self.length] = self.hidden[:, : self.length]
        both[:, self.length :] = self._bytes(hidden, self.batch, length)
        return RawTensor(self.dtype, (self.batch, self.length + length, self.hidden_size), both.reshape(-1))

    def replay(self) -> tuple[RawTensor, Optional[RawTensor]]:
        """(hidden states, deep prompts or None) of positions [0, length), in the node's dtype: one prefill
        rebuilds the cache."""
        if self.lost is not None:
            raise HistoryLost(f"its history is not held: {self.lost}")
        shape = (self.batch, self.length, self.hidden_size)
        hidden = RawTensor(self.dtype, shape, np.ascontiguousarray(self.hidden[:, : self.length]).reshape(-1))
        if not self.prompts:
            return hidden, None
        n_blocks = self.prompts[0][1].shape[0]
        covered = max(
            first + values.shape[2] for first, values in self.prompts
        )  # the runtime adds them to [0, covered)
        dense = np.zeros((n_blocks, self.batch, covered, self.width), dtype=np.uint8)
        for first, values in self.prompts:
            dense[:, :, first : first + values.shape[2]] = values  # a batch-1 prompt applies to every row
        prompts = RawTensor(self.dtype, (n_blocks, self.batch, covered, self.hidden_size), dense.reshape(-1))
        return hidden, prompts


def last_positions(output: RawTensor, length: int) -> RawTensor:
    """[batch, T, hidden] -> its last `length` positions."""
    batch, total, hidden = output.shape
    rows = np.frombuffer(output.data, dtype=np.uint8).reshape(batch, total, hidden * output.itemsize)
    return RawTensor(output.dtype, (batch, length, hidden), np.ascontiguousarray(rows[:, total - length :]).reshape(-1))
