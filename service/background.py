"""The API process' background tasks, supervised: none of them may end silently.

A task is either *restarted* whenever it ends (an exception, a return, a cancellation from
elsewhere), after a pause that doubles from RESTART_FIRST_S to RESTART_MAX_S while it keeps
failing (a run of RESTART_RESET_S or more starts over), or *essential*: the process cannot serve
without it (the all-in-one process' embedded worker), so its end, whatever the cause, ends the
process with a non-zero status and one log line that says why; its supervisor (Kubernetes,
compose's restart policy, systemd) starts a fresh one.

`/healthz` fails while a task is down (restarting, or essential and ended) and while a probe
reports a problem (the embedded worker's progress): see `problems`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service import metrics
from service.cancelling import cancel_and_wait

logger = logging.getLogger(__name__)

RESTART_FIRST_S = 0.5
RESTART_MAX_S = 30.0
RESTART_RESET_S = 60.0

# Ends the process: (why, exit status). The default only logs (an app served in tests).
OnFatal = Callable[[str, int], None]
# A check of something that has no task of its own to end: a problem, or None.
Probe = Callable[[], str | None]


@dataclass
class TaskState:
    state: str = "running"  # running | restarting | ended | stopped
    restarts: int = 0
    last_error: str | None = None


def how_it_ended(task: asyncio.Task) -> tuple[str, BaseException | None]:
    """How a finished task ended, in words, and its exception if it raised one."""
    if task.cancelled():
        return "was cancelled", None
    error = task.exception()
    if error is None:
        return "returned", None
    return f"raised {type(error).__name__}: {error}", error


class BackgroundTasks:
    def __init__(self, on_fatal: OnFatal | None = None) -> None:
        self._on_fatal = on_fatal
        self.states: dict[str, TaskState] = {}
        self._supervisors: dict[str, asyncio.Task] = {}
        self._probes: dict[str, Probe] = {}
        self.fatal: str | None = None
        self._stopping = False

    def keep_running(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run `run()` as task `name` until `stop`, again whenever it ends."""
        state = self.states[name] = TaskState()
        self._supervisors[name] = asyncio.create_task(
            self._restarting(name, run, state), name=f"{name}-supervisor"
        )

    async def _restarting(self, name: str, run: Callable[[], Awaitable[None]], state: TaskState) -> None:
        pause_s = RESTART_FIRST_S
        while True:
            started = time.monotonic()
            state.state = "running"
            task = asyncio.ensure_future(run())
            task.set_name(name)
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError:  # stop(): the supervisor itself is cancelled
                await cancel_and_wait(task)
                raise
            why, error = how_it_ended(task)
            if self._stopping:
                state.state = "stopped"
                return
            if time.monotonic() - started >= RESTART_RESET_S:
                pause_s = RESTART_FIRST_S
            state.state, state.restarts, state.last_error = "restarting", state.restarts + 1, why
            metrics.BACKGROUND_RESTARTS.labels(name).inc()
            logger.error(
                "background task %s %s; restarting it in %.1f s (restart %d)",
                name,
                why,
                pause_s,
                state.restarts,
                exc_info=error,
            )
            await asyncio.sleep(pause_s)
            pause_s = min(2 * pause_s, RESTART_MAX_S)

    def essential(
        self, name: str, run: Awaitable[None], exit_status: Callable[[BaseException | None], int]
    ) -> asyncio.Task:
        """Run `run` as task `name`; its end before `stopping()` ends the process with
        `exit_status(the exception or None)`."""
        state = self.states[name] = TaskState()
        task = asyncio.ensure_future(run)
        task.set_name(name)

        def ended(task: asyncio.Task) -> None:
            why, error = how_it_ended(task)
            if self._stopping:
                state.state = "stopped"
                if error is not None:
                    logger.error("background task %s %s while the process stops", name, why, exc_info=error)
                return
            state.state, state.last_error = "ended", why
            self.fail(f"{name} {why}", exit_status(error), error)

        task.add_done_callback(ended)
        return task

    def probe(self, name: str, check: Probe) -> None:
        self._probes[name] = check

    def fail(self, why: str, status: int, error: BaseException | None = None) -> None:
        """The process cannot serve any more: say why once, fail /healthz, end the process."""
        if self.fatal is not None:
            return
        self.fatal = why
        logger.critical(
            "%s: this process cannot serve without it; exiting with status %d so that it is restarted",
            why,
            status,
            exc_info=error,
        )
        if self._on_fatal is not None:
            self._on_fatal(why, status)

    def problems(self) -> list[str]:
        """Why the process is not alive; empty when it is."""
        found = [] if self.fatal is None else [self.fatal]  # an essential task ended
        for name, state in self.states.items():
            if state.state == "restarting":
                found.append(f"{name} {state.last_error}; restarting")
        for name, check in self._probes.items():
            problem = check()
            if problem is not None:
                found.append(f"{name}: {problem}")
        return found

    def detail(self) -> dict[str, dict]:
        return {
            name: {"state": state.state, "restarts": state.restarts, "last_error": state.last_error}
            for name, state in self.states.items()
        }

    def stopping(self) -> None:
        """From now on tasks end because the process stops: not a failure."""
        self._stopping = True

    async def stop_task(self, name: str) -> None:
        """Stop restarted task `name`."""
        supervisor = self._supervisors.pop(name)
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        self.states[name].state = "stopped"

    async def stop(self) -> None:
        """Stop every restarted task (essential ones are stopped by their owners)."""
        self._stopping = True
        for name in list(self._supervisors):
            await self.stop_task(name)
