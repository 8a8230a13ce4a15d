"""The worker's CPU per thread on /metrics (streams.metrics.ThreadCpu)."""

from __future__ import annotations

import gc
import threading
import time

from streams.metrics import Metrics, gc_paused, thread_cpu_seconds


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_busy_thread_is_reported_by_its_name_with_the_cpu_it_used() -> None:
    done = threading.Event()

    def work() -> None:
        _spin(0.3)
        done.wait(5)  # still alive when read: a thread's time is read from its own /proc entry

    thread = threading.Thread(target=work, name="busy-test-thread")
    thread.start()
    try:
        while thread_cpu_seconds().get("busy-test-thread", 0.0) < 0.25:
            time.sleep(0.05)
            assert thread.is_alive()
        exposed = Metrics().exposition()[0].decode()
    finally:
        done.set()
        thread.join()
    assert 'instructrec_thread_cpu_seconds_total{thread="busy-test-thread"}' in exposed
    assert 'instructrec_thread_cpu_seconds_total{thread="MainThread"}' in exposed


def test_garbage_collection_pauses_are_timed_while_installed_and_not_after() -> None:
    metrics = Metrics()
    with gc_paused(metrics):
        gc.collect()  # a full collection: generation 2
    gc.collect()
    text = metrics.exposition()[0].decode()
    assert 'instructrec_gc_pause_seconds_count{generation="2"} 1.0' in text
    assert all(getattr(hook, "histogram", None) is not metrics.gc_pause_seconds for hook in gc.callbacks)
