"""Per-user request rate: a token bucket per user id, held by one process (no shared state).

A user may send `burst` queries at once and `rate_per_s` per second sustained. A bucket refills continuously
and is computed lazily when its user asks again, so the limiter does no work between requests.

Memory is bounded. A bucket untouched for `burst / rate_per_s` seconds is full again, which is exactly what
an absent bucket means, so idle users are dropped without changing any answer. Beyond `max_users` live
buckets the least recently seen user is dropped too: only a flood of more distinct users than that within
one refill time lets anyone start over early (with a full bucket).

Each worker holds its own limiters. On the topic path (`streams.agents.queries`) that is exact per user:
queries are keyed by user id, so all of a user's queries reach the one worker that owns the user's
partition. The web view's limiter (`streams.web`) sees only the requests that reach its own worker.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from instructrec.config import StreamSettings
from instructrec.events import EventError

MAX_USERS = 100_000  # live buckets at most: a few tens of MB in the worst case


class RateLimited(EventError):
    """A query over its user's rate, as a dead letter's error: the sender's doing, not the worker's, so it is
    logged like an invalid event's problem."""

    def __init__(self, reason: str) -> None:
        super().__init__("queries", [("", reason)])


class UserRateLimiter:
    """Token buckets by user id; `clock` (monotonic seconds) is injectable for tests."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_users: int = MAX_USERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1 or max_users < 1:
            raise ValueError(
                f"rate_per_s > 0, burst >= 1 and max_users >= 1, got {rate_per_s}, {burst}, {max_users}"
            )
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_users = max_users
        self.clock = clock
        self._refill_s = burst / rate_per_s  # from empty to full: a bucket idle this long is a fresh one
        # user id -> (tokens, when they were counted), least recently seen first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: StreamSettings) -> UserRateLimiter | None:
        """The configured limiter; None when `user_rate_per_s` is 0 (no limit)."""
        if not settings.user_rate_per_s:
            return None
        return cls(settings.user_rate_per_s, settings.user_burst)

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, user_id: str) -> bool:
        """Take one of `user_id`'s tokens: True if there was one, False if the user is over the rate."""
        now = self.clock()
        self._drop_idle(now)
        tokens = self._tokens(user_id, now)
        allowed = tokens >= 1.0
        self._buckets[user_id] = (tokens - 1.0 if allowed else tokens, now)
        self._buckets.move_to_end(user_id)
        if len(self._buckets) > self.max_users:
            self._buckets.popitem(last=False)
        return allowed

    def refusal(self, user_id: str) -> str:
        """Why `user_id`'s request was refused, for the sender (and when to try again)."""
        return (
            f"rate limited: user {user_id!r} sent more than {self.burst} queries at once or "
            f"{self.rate_per_s:g}/s sustained; retry in {self.retry_after_s(user_id):.1f} s"
        )

    def retry_after_s(self, user_id: str) -> float:
        """Seconds until `user_id` has a token again (0: now)."""
        return max(0.0, (1.0 - self._tokens(user_id, self.clock())) / self.rate_per_s)

    def _tokens(self, user_id: str, now: float) -> float:
        found = self._buckets.get(user_id)
        if found is None:
            return float(self.burst)
        tokens, counted = found
        return min(float(self.burst), tokens + (now - counted) * self.rate_per_s)

    def _drop_idle(self, now: float) -> None:
        # The oldest entry is the longest idle: stop at the first one still refilling.
        while self._buckets:
            user_id, (_, counted) = next(iter(self._buckets.items()))
            if now - counted < self._refill_s:
                return
            del self._buckets[user_id]
