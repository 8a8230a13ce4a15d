"""The Faust patches in streams.kafka.compat that keep records from reaching the streams during a seek (its
effect under load runs in the integration broker-restart test), put a partition nothing was committed on
back to its first offset at that seek (its effect runs in the integration crash test), and keep an offset commit from overtaking the
messages still in the producer buffer (its effect runs in the integration crash test); and the aiokafka
patch that makes a member the group leader did not know of join again instead of dying."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from faust.transport.consumer import Consumer, ThreadDelegateConsumer
from faust.transport.producer import ProducerBuffer
from faust.types import TP

from streams.kafka.compat import (
    flush_the_whole_buffer,
    rejoin_on_empty_assignment,
    seek_uncommitted_to_the_start,
    seek_with_flow_stopped,
)

QUERIES = TP("queries", 0)


class StubConsumer:
    """What Faust's perform_seek touches on a consumer, and the flow as the seek saw it."""

    def __init__(self, committed: dict[TP, int], error: BaseException | None = None) -> None:
        self.flow_active = True
        self._read_offset: dict[TP, int | None] = {QUERIES: 42}  # records read past the commit
        self._committed_offset: dict[TP, int | None] = {}
        self.committed, self.error = committed, error
        self.flow_during_seek: bool | None = None

    def stop_flow(self) -> None:
        self.flow_active = False

    def resume_flow(self) -> None:
        self.flow_active = True

    async def seek_to_committed(self) -> dict[TP, int]:
        self.flow_during_seek = self.flow_active
        if self.error is not None:
            raise self.error
        return self.committed


@pytest.fixture(autouse=True)
def patched() -> None:
    seek_with_flow_stopped()
    seek_with_flow_stopped()  # idempotent
    seek_uncommitted_to_the_start()
    seek_uncommitted_to_the_start()
    flush_the_whole_buffer()
    flush_the_whole_buffer()


async def test_the_seek_runs_with_the_flow_stopped_and_leaves_it_to_the_caller() -> None:
    consumer = StubConsumer({QUERIES: 7})
    await Consumer.perform_seek(consumer)
    assert consumer.flow_during_seek is False
    assert consumer._read_offset[QUERIES] == 7  # the records past the commit are read again
    assert not consumer.flow_active  # resumed by the caller, after it has cleared the stream queues


async def test_a_failed_seek_puts_the_flow_back() -> None:
    consumer = StubConsumer({}, error=TimeoutError("no answer"))
    with pytest.raises(TimeoutError):
        await Consumer.perform_seek(consumer)
    assert consumer.flow_active


async def test_a_seek_with_the_flow_already_stopped_keeps_it_stopped() -> None:
    consumer = StubConsumer({}, error=TimeoutError("no answer"))
    consumer.flow_active = False
    with pytest.raises(TimeoutError):
        await Consumer.perform_seek(consumer)
    assert not consumer.flow_active


class StubDelegate:
    """What the seek_to_committed patch touches on Faust's consumer: the committed offsets its thread's seek
    found, the first offsets of the partitions, and the seeks made."""

    def __init__(self, committed: dict[TP, int | None], reset: str = "earliest") -> None:
        async def seek_to_committed() -> dict[TP, int | None]:
            return committed

        self._thread = SimpleNamespace(seek_to_committed=seek_to_committed)
        self.app = SimpleNamespace(
            conf=SimpleNamespace(consumer_auto_offset_reset=reset),
            tables=SimpleNamespace(changelog_topics={"app-contexts-changelog"}),
        )
        self.seeks: list[dict[TP, int]] = []

    async def earliest_offsets(self, *partitions: TP) -> dict[TP, int]:
        return {tp: 3 for tp in partitions}  # the log's start, past retention

    async def seek_wait(self, partitions: dict[TP, int]) -> None:
        self.seeks.append(dict(partitions))


async def test_a_partition_nothing_was_committed_on_goes_back_to_its_first_offset() -> None:
    fresh, zero, committed = TP("queries", 1), TP("queries", 2), TP("queries", 3)
    changelog = TP("app-contexts-changelog", 1)
    consumer = StubDelegate({QUERIES: None, fresh: None, zero: 0, committed: 7, changelog: None})
    found = await ThreadDelegateConsumer.seek_to_committed(consumer)
    assert found[committed] == 7 and found[QUERIES] is None  # Faust's perform_seek still gets what it read
    # aiokafka seeks only to a committed offset above 0; a changelog's position is the recovery's to set
    assert consumer.seeks == [{QUERIES: 3, fresh: 3, zero: 3}]


async def test_with_latest_reset_or_everything_committed_nothing_more_is_sought() -> None:
    latest = StubDelegate({QUERIES: None}, reset="latest")
    await ThreadDelegateConsumer.seek_to_committed(latest)
    everything = StubDelegate({QUERIES: 7})
    await ThreadDelegateConsumer.seek_to_committed(everything)
    assert latest.seeks == everything.seeks == []


# ------------------------------------------------------------------------------------------- the buffer


class SlowTopic:
    """A topic whose hand-over of a message to the client takes longer than Faust's flush waited (0.1 s):
    as on a busy event loop, or when aiokafka waits for a full batch to drain."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.published: list[object] = []

    async def publish_message(self, fut, wait: bool = False) -> None:
        await asyncio.sleep(self.delay_s)
        self.published.append(fut)


def _queued(topic: SlowTopic, n: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(message=SimpleNamespace(channel=topic)) for _ in range(n)]


async def _running_buffer() -> ProducerBuffer:
    buffer = ProducerBuffer()
    buffer.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))
    await buffer.start()
    return buffer


async def test_a_flush_returns_only_once_every_queued_message_is_handed_over() -> None:
    topic = SlowTopic(0.25)
    buffer = await _running_buffer()
    try:
        for fut in _queued(topic, 3):
            buffer.put(fut)
        await asyncio.wait_for(buffer.flush(), timeout=10)
        assert len(topic.published) == 3  # Faust's own flush returned with all 3 still queued
    finally:
        await buffer.stop()


async def test_a_flush_waits_for_the_message_being_handed_over() -> None:
    topic = SlowTopic(0.25)
    buffer = await _running_buffer()
    try:
        (fut,) = _queued(topic, 1)
        buffer.put(fut)
        await asyncio.sleep(0.05)  # the sender has taken it off the queue: the buffer's size is 0
        assert buffer.size == 0
        await asyncio.wait_for(buffer.flush(), timeout=10)
        assert topic.published == [fut]
    finally:
        await buffer.stop()


async def test_a_buffer_that_has_stopped_refuses_to_flush_what_it_holds() -> None:
    buffer = await _running_buffer()
    await buffer.stop()
    buffer.put(_queued(SlowTopic(0.0), 1)[0])
    with pytest.raises(RuntimeError, match="not Running"):
        await buffer.flush()


async def test_a_flush_waits_only_for_what_was_queued_before_it() -> None:
    """A producer that keeps queueing must not hold a commit off."""
    topic = SlowTopic(0.25)
    buffer = await _running_buffer()
    try:
        first, *later = _queued(topic, 3)
        buffer.put(first)
        flush = asyncio.create_task(buffer.flush())
        await asyncio.sleep(0.05)
        for fut in later:
            buffer.put(fut)
        await asyncio.wait_for(flush, timeout=10)
        assert topic.published == [first]
        await asyncio.wait_for(buffer.flush(), timeout=10)
        assert topic.published == [first, *later]
    finally:
        await buffer.stop()


async def test_empty_assignment_bytes_make_the_member_join_again_and_real_ones_pass_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiokafka.consumer.group_coordinator import CoordinatorGroupRebalance

    async def joined(self):  # what SyncGroup handed back: (protocol, this member's assignment bytes)
        return self.answer

    monkeypatch.setattr(CoordinatorGroupRebalance, "perform_group_join", joined)
    rejoin_on_empty_assignment()
    rejoin_on_empty_assignment()  # idempotent: one wrapper
    join = CoordinatorGroupRebalance.perform_group_join
    assert await join(SimpleNamespace(answer=("faust", b""))) is None  # a failed join: aiokafka joins again
    assigned = ("faust", b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # version 0, no partitions
    assert await join(SimpleNamespace(answer=assigned)) == assigned
    assert await join(SimpleNamespace(answer=None)) is None
