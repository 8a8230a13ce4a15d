"""The Faust patch in streams.kafka.compat that keeps records from reaching the streams during a seek (its
effect under load runs in the integration broker-restart test)."""

from __future__ import annotations

import pytest
from faust.transport.consumer import Consumer
from faust.types import TP

from streams.kafka.compat import seek_with_flow_stopped

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
