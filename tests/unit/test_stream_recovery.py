"""The recovery watchdog's judgement of progress (its wiring runs in the integration failover test)."""

from streams.state.recovery import Progress


def test_a_recovery_is_stalled_only_when_nothing_moved_for_the_whole_window() -> None:
    progress = Progress(since=0.0)
    assert not progress.stalled(12, now=0.0, stall_s=30)  # first sight: noted, not judged
    assert not progress.stalled(12, now=29.0, stall_s=30)
    assert progress.stalled(12, now=30.0, stall_s=30)


def test_progress_restarts_the_clock() -> None:
    progress = Progress(since=0.0)
    progress.stalled(12, now=0.0, stall_s=30)
    assert not progress.stalled(5, now=29.0, stall_s=30)  # events arrived
    assert not progress.stalled(5, now=58.0, stall_s=30)
    assert progress.stalled(5, now=59.0, stall_s=30)


def test_a_recovery_with_nothing_left_is_never_stalled() -> None:
    progress = Progress(since=0.0)
    progress.stalled(0, now=0.0, stall_s=30)
    assert not progress.stalled(0, now=600.0, stall_s=30)


def test_reset_forgets_what_was_seen() -> None:
    progress = Progress(since=0.0)
    progress.stalled(7, now=0.0, stall_s=30)
    progress.reset(now=40.0)
    assert not progress.stalled(7, now=45.0, stall_s=30)
