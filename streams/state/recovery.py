"""A watchdog that restarts a Faust table recovery which has stopped making progress.

Seen on the local broker under CPU load (the two-worker failover test, 1 run in 3 at load average 4 on 2
cores): after a rebalance the survivor seeks the changelog partitions it took over, resumes them, and then
never receives a changelog event. Faust logs "No event received for active tp … since recovery start" for
minutes, the worker never leaves recovery, and the queries of every partition it owns go unanswered.

Recovery restarts on Faust's own signal for "another rebalance started": fresh highwaters, a new seek to
the tables' persisted offsets, the partitions resumed again — what a rebalance would do, without moving any
partition. A recovery that is making progress (its remaining changelog events go down) is left alone.
tests/integration/test_stream_failover.py injects the stall into a worker and checks that it answers from
the recovered tables.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streams.app import StreamApp

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """What the watchdog last saw of the running recovery."""

    remaining: int | None = None
    since: float = field(default_factory=time.monotonic)
    restarts: int = 0

    def stalled(self, remaining: int, now: float, stall_s: float) -> bool:
        """Whether `remaining` events have been waiting, unchanged, for `stall_s` seconds (and note them)."""
        if remaining != self.remaining:
            self.remaining, self.since = remaining, now
            return False
        return remaining > 0 and now - self.since >= stall_s

    def reset(self, now: float) -> None:
        self.remaining, self.since = None, now


def install(stream: StreamApp) -> None:
    """Watch from the first partition assignment on. (Not an `app.timer`: Faust starts timers only after the
    first recovery has completed, so a timer cannot rescue the recovery a fresh worker starts with.)"""
    stall_s = stream.settings.stream.recovery_stall_s
    interval_s = max(1.0, stall_s / 5)
    progress = Progress()
    running: list[asyncio.Future] = []  # the watchdog, once started

    async def watch() -> None:
        app = stream.app
        while not app.should_stop:
            await app.sleep(interval_s)  # returns early when the app stops
            check(stream, progress, stall_s)

    @stream.app.on_partitions_assigned.connect
    async def start_watchdog(app, assigned, **kwargs) -> None:
        if not running:
            running.append(app.add_future(watch()))


def check(stream: StreamApp, progress: Progress, stall_s: float) -> None:
    """One look at the recovery: restart it if it has stalled."""
    recovery = stream.app.tables.recovery
    now = time.monotonic()
    if not recovery.in_recovery:
        progress.reset(now)
        return
    remaining = recovery.active_remaining_total()
    if progress.stalled(remaining, now, stall_s):
        progress.restarts += 1
        stream.metrics.recovery_restarts.inc()
        log.warning(
            "table recovery stalled: %d changelog events outstanding and none received for %.0f s; "
            "restarting recovery (restart %d)",
            remaining,
            now - progress.since,
            progress.restarts,
        )
        progress.reset(now)
        recovery.signal_recovery_start.set()
