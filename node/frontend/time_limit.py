"""Awaiting with a time limit, without asyncio.wait_for's extra task.

asyncio.wait_for (before Python 3.12) runs the awaited coroutine as a task of its own and wakes its caller
through a second future: three turns of the event loop where the awaited thing is ready in one. Three of
them sat on the path of every inference step (the keeper's read of a client message, the frontend's read
of a frame, the session's wait for its next step), each costing tens of microseconds on a loaded machine.
asyncio.timeout (3.11) cancels the caller's own task instead.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Awaitable, TypeVar

T = TypeVar("T")

if sys.version_info >= (3, 11):

    async def within(awaitable: Awaitable[T], seconds: float) -> T:
        """`await awaitable`, or asyncio.TimeoutError after `seconds`."""
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover - the CI's Python is 3.11

    async def within(awaitable: Awaitable[T], seconds: float) -> T:
        """`await awaitable`, or asyncio.TimeoutError after `seconds`."""
        return await asyncio.wait_for(awaitable, seconds)
