"""Cancelling a task so that it really ends.

On Python 3.11 a task cancelled at the moment the operation it awaits through `asyncio.wait_for`
completes gets that operation's result instead of `CancelledError`: the cancellation is lost
(CPython gh-86296, fixed in 3.12 where `wait_for` is built on `asyncio.timeout`). redis-py sends
every command under `wait_for` (its default socket timeout), so one `cancel()` of a task that loops
over Redis calls back to back is lost most of the time (74 of 100 against a local Redis), and the
loop goes on: a stopping worker once waited forever for its heartbeat task. Both helpers cancel
again until the task has ended; a later cancellation lands on one of the task's next awaits.
"""

from __future__ import annotations

import asyncio
from typing import Any

# How long a cancelled task may take to end before it is cancelled again.
RECANCEL_S = 0.02

_finishing: set[asyncio.Task[None]] = set()


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel `tasks` and return once every one has ended. How each ended is the caller's to
    read (`service.background.how_it_ended`); an exception is marked retrieved, not raised."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
    _retrieve(tasks)


def cancel_in_background(*tasks: asyncio.Future[Any]) -> None:
    """`cancel_and_wait` for a caller that must not wait (a request's reply, a synchronous close):
    the tasks are cancelled now, and again until they have ended."""
    if all(task.done() for task in tasks):
        _retrieve(tasks)
        return
    finishing = asyncio.ensure_future(cancel_and_wait(*tasks))
    _finishing.add(finishing)
    finishing.add_done_callback(_finishing.discard)


def _retrieve(tasks: tuple[asyncio.Future[Any], ...]) -> None:
    """Mark each ended task's exception retrieved: asyncio logs an unretrieved one as an error."""
    for task in tasks:
        if not task.cancelled():
            task.exception()
