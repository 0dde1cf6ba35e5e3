"""Awaiting with a time limit, without a new task per wait.

asyncio.wait_for runs a coroutine as a task of its own, with a timer and callbacks; on the paths every
inference step takes (a client frame read by the keeper, the session's next step) that costs more than
the wait itself usually does. asyncio.timeout (Python 3.11) limits the running task instead; on 3.10 it
is wait_for as before. Both raise asyncio.TimeoutError.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Awaitable, Optional, TypeVar

T = TypeVar("T")

if sys.version_info >= (3, 11):

    async def within(awaitable: Awaitable[T], seconds: Optional[float]) -> T:
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover - the CI runs 3.11

    async def within(awaitable: Awaitable[T], seconds: Optional[float]) -> T:
        return await asyncio.wait_for(awaitable, seconds)
