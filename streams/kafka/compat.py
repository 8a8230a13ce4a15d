"""Every use of a private aiokafka or Faust API, and every process-wide patch, lives here — nowhere else.

Written against aiokafka 0.14.0 and faust-streaming 0.15.3 (the pinned versions); each piece says what it
relies on, so that an upgrade knows what to re-check. The patches are harmless against a real Kafka.

1. `rejoin_on_stale_commit` (patches aiokafka's GroupCoordinator._send_req): an offset commit made during a
rebalance is answered ILLEGAL_GENERATION by noida-db where Kafka answers REBALANCE_IN_PROGRESS. On
ILLEGAL_GENERATION aiokafka forgets its member id and rejoins as a new member; noida-db then keeps the old id
as a phantom member and never completes the rebalance — the survivor of a failover is stuck with no
partitions, re-joining every rebalance timeout (reproduced with two plain aiokafka consumers, no Faust).
Read as REBALANCE_IN_PROGRESS, the same answer makes aiokafka rejoin with its member id, and the group
settles in a heartbeat. Against a real Kafka a truly stale member rejoins with its old id, the coordinator
answers UNKNOWN_MEMBER_ID and aiokafka resets then: one extra round trip. The commit fails either way
(at-least-once: its events come again and are absorbed as duplicates).

2. `pause_after_empty_fetch` (patches aiokafka's AIOKafkaClient.send): noida-db answers a fetch at once when
there is nothing to read, ignoring the request's max wait, so aiokafka fetches again immediately and every
idle consumer spins a core (tests/integration/test_kafka_compat.py counts the fetches). The shim waits
`pause_s` after an empty answer that came back before the max wait; a record arriving meanwhile waits at
most `pause_s` longer. A real Kafka holds an empty fetch for its max wait, so it never triggers.

3. `processing(event)` (Faust's private `faust.streams._current_event`): Faust picks the changelog partition
and the RocksDB shard of a table write from the *current event*, which during a micro-batch
(`take_events`) is whichever event arrived last, not the one being handled.

4. `refresh_metadata(consumer)` (aiokafka's private `consumer._client`): a consumer outside any group learns
a freshly created topic's partitions only after a metadata refresh, which the public API does not offer.

6. `close_fetcher_quietly` (patches aiokafka's Fetcher.close): close() cancels its pending fetch tasks and
then awaits each, which re-raises their CancelledError out of close(); with the broker gone every fetch is
in its retry back-off, so consumer.stop() raises, Faust's consumer thread dies before it reports stopped,
and the worker waits out mode's 60 s stop timeout (aio-libs/aiokafka#647, open; measured: SIGTERM after
the broker stopped took 63.9 s, 2.7 s with the patch — tests/integration/test_shutdown.py). The patch
awaits the cancelled tasks without re-raising their cancellation; a cancellation of close() itself still
propagates. Harmless with a broker up: the tasks end the same way.

5. `hide_sasl_tokens` (a filter on aiokafka's "aiokafka.conn" logger): aiokafka logs every request and
response at DEBUG, the SASL exchange included, and a PLAIN token is the password in clear (a SCRAM one is
enough for an offline guess at it). The filter puts a placeholder in place of any SaslAuthenticate struct
(API key 36) among a record's arguments; the record is still logged.

7. `seek_with_flow_stopped` (patches Faust's Consumer.perform_seek): at the end of a rebalance Faust resumes
the stream partitions, seeks them to their committed offsets (`perform_seek`), empties every stream's queue
(`flow_control.resume()` clears them) and resumes the consumer's flow last — but the flow is running already
(the recovery resumed it to read the changelogs). Records fetched while the seek waits on the broker go into
the queues and count as read (`Consumer._read_offset`), records from the fetch before the seek keep arriving
after it and move the read offset on again, the clear throws the queued ones away, and their second fetch,
below the read offset, is dropped ("DROPPED MESSAGE" in Faust's DEVLOG); or a record far ahead of the reset
read offset makes Faust mark the offsets between as a gap and commit them. Nothing fails: the records are just
never handled. A broker restart under load leaves a backlog to fetch at exactly that moment: 9 to 35
acknowledged queries stored and never answered in 3 of 7 runs of tests/integration/test_faults.py (one run:
the 9 records cleared right after the seek, at 7-9, 6-8 and 9-11 of three partitions, were the 9 lost). The
patch stops the flow before the seek and leaves it stopped; it relies on perform_seek's callers: the recovery
(`_resume_streams`, `on_recovery_completed`) resumes the flow right after the clear, and `Consumer.getmany`
seeks only with the flow stopped already. Records handed out before the seek are fetched again from the
committed offsets (with none committed, from the first: patch 9); any an agent had taken already are handled
twice and absorbed as duplicates. A seek that fails puts the flow back as it was. The race is Faust's: a real
Kafka hits it too whenever records are waiting as a rebalance ends.

8. `flush_the_whole_buffer` (patches Faust's ProducerBuffer.flush and ._send_pending): before it commits
offsets Faust flushes its producer, and the first step, `ProducerBuffer.flush`, gives up as soon as no
message has been handed to aiokafka for 0.1 s (`flush_atmost`: a timeout ends the flush) — with messages
still queued. Every table write and every `send_soon` waits in that buffer, so on a busy event loop (2 cores,
a micro-batch being rendered) the commit goes ahead while the answers and served-log entries of queries it
covers are still in the worker's memory; a crash then loses them with their offsets committed, and the
restarted worker never sees those queries again. Read in faust-streaming 0.15.3 after the crash test
(tests/integration/test_crash.py) lost 4 of 24 queries in CI while the restarted worker was healthy and
consuming. The patch waits until every message queued before the flush began has been handed over (not
for later ones: a busy producer must not hold a commit off); a buffer that is not running still raises as
Faust's does (its sender has stopped). Against any broker: it only makes the flush mean what Faust's commit
relies on.

9. `seek_uncommitted_to_the_start` (patches Faust's ThreadDelegateConsumer.seek_to_committed): the seek of
patch 7 (Faust's `perform_seek`) puts a partition back only where a committed offset exists — aiokafka's
`seek_to_committed` moves a partition only to a committed offset above 0 — so a partition nothing was ever
committed on keeps its fetch position, past the records handed out before the seek and dropped with the flow.
Seen in the crash test: the restarted worker never answered the first queries of the partitions the killed
worker had not committed on (0@0, 1@0, 3@0 and 3@1; the partition with a commit lost nothing), yet it went on
to commit past them. The recovery resumes the flow to read the changelogs, so the stream partitions are
fetched too; at its closing seek, one of five runs found those three partitions at 1, 1 and 2 with nothing
committed (and with the patch answered all 24). With `consumer_auto_offset_reset` "earliest" (this project's
setting) the patch seeks those partitions of the app's own topics to their first offset (a changelog's
position is the table recovery's to set); the records handed out already come again and are absorbed as
duplicates. Under "latest" it changes nothing: where that position was is not known any more. Against a real
Kafka too.

10. `rejoin_on_empty_assignment` (patches aiokafka's CoordinatorGroupRebalance.perform_group_join): a
member that the group leader did not know of when it assigned (two workers joining one generation at once
on noida-db) gets empty bytes from SyncGroup, and aiokafka's `_on_join_complete` fails to decode them
("unpack requires a buffer of 2 bytes"): its coordinator routine dies and the worker never rejoins, so it
never becomes healthy (tests/integration/test_stream_failover.py, twice in many runs). Every assignor,
Faust's included, encodes an assignment for each member it knows, even one without partitions, so empty
bytes mean "not known": the patch treats them as a failed join, and aiokafka backs off and joins again,
which starts a generation that includes it. Kafka hands the leader every member of the generation, so
there it should never fire (reasoned from the protocol, not tried: no Kafka here).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import weakref
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

ILLEGAL_GENERATION = 22
REBALANCE_IN_PROGRESS = 27
_OFFSET_COMMIT = 8  # Kafka API key
_FETCH = 1  # Kafka API key
_SASL_AUTHENTICATE = 36  # Kafka API key


def rejoin_on_stale_commit() -> None:
    """Install the shim (process-wide, idempotent)."""
    from aiokafka.consumer.group_coordinator import GroupCoordinator

    if getattr(GroupCoordinator._send_req, "_instructrec_shim", False):
        return
    original = GroupCoordinator._send_req

    @functools.wraps(original)
    async def _send_req(self, request):
        response = await original(self, request)
        if getattr(response, "API_KEY", None) == _OFFSET_COMMIT and hasattr(response, "topics"):
            response.topics = [
                (topic, [_translated(p) for p in partitions]) for topic, partitions in response.topics
            ]
        return response

    _send_req._instructrec_shim = True
    GroupCoordinator._send_req = _send_req


def _translated(partition: tuple) -> tuple:
    number, error_code, *rest = partition
    if error_code == ILLEGAL_GENERATION:
        log.info(
            "offset commit during a rebalance answered ILLEGAL_GENERATION: rejoining with the same member id"
        )
        return (number, REBALANCE_IN_PROGRESS, *rest)
    return partition


def rejoin_on_empty_assignment() -> None:
    """Install the perform_group_join patch (process-wide, idempotent): see the module docstring."""
    from aiokafka.consumer.group_coordinator import CoordinatorGroupRebalance

    if getattr(CoordinatorGroupRebalance.perform_group_join, "_instructrec_shim", False):
        return
    original = CoordinatorGroupRebalance.perform_group_join

    @functools.wraps(original)
    async def perform_group_join(self):
        joined = await original(self)
        if joined is not None and not joined[1]:
            log.warning("the group leader gave this member no assignment at all: joining the group again")
            return None  # what aiokafka does after a failed join: back off, join again
        return joined

    perform_group_join._instructrec_shim = True
    CoordinatorGroupRebalance.perform_group_join = perform_group_join


def pause_after_empty_fetch(pause_s: float) -> None:
    """Install the empty-fetch pause (process-wide; the first installation's pause holds)."""
    from aiokafka.client import AIOKafkaClient

    if getattr(AIOKafkaClient.send, "_instructrec_shim", False) or pause_s <= 0:
        return
    original = AIOKafkaClient.send

    @functools.wraps(original)
    async def send(self, node_id, request, *args, **kwargs):
        started = time.monotonic()
        response = await original(self, node_id, request, *args, **kwargs)
        if getattr(request, "API_KEY", None) == _FETCH and _empty(response):
            left = _max_wait_ms(request) / 1000 - (time.monotonic() - started)
            if left > 0:
                await asyncio.sleep(min(pause_s, left))
        return response

    send._instructrec_shim = True
    AIOKafkaClient.send = send


def close_fetcher_quietly() -> None:
    """Install the Fetcher.close patch (process-wide, once)."""
    from aiokafka.consumer.fetcher import Fetcher

    if getattr(Fetcher.close, "_instructrec_shim", False):
        return

    async def close(self) -> None:  # aiokafka 0.14.0's close, but for its last loop
        self._closed = True
        self._fetch_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._fetch_task
        for waiter in self._fetch_waiters:
            self._notify(waiter)
        pending = list(self._pending_tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    close._instructrec_shim = True
    Fetcher.close = close


def seek_with_flow_stopped() -> None:
    """Install the perform_seek patch (process-wide, idempotent): see the module docstring."""
    from faust.transport.consumer import Consumer

    if getattr(Consumer.perform_seek, "_instructrec_shim", False):
        return
    original = Consumer.perform_seek

    @functools.wraps(original)
    async def perform_seek(self) -> None:
        was_active = self.flow_active
        self.stop_flow()  # nothing reaches a stream queue until the caller has cleared them and resumes
        try:
            await original(self)
        except BaseException:
            if was_active:  # no caller will resume a flow whose seek failed
                self.resume_flow()
            raise

    perform_seek._instructrec_shim = True
    Consumer.perform_seek = perform_seek


def seek_uncommitted_to_the_start() -> None:
    """Install the seek_to_committed patch (process-wide, idempotent): see the module docstring."""
    from faust.transport.consumer import ThreadDelegateConsumer

    if getattr(ThreadDelegateConsumer.seek_to_committed, "_instructrec_shim", False):
        return
    original = ThreadDelegateConsumer.seek_to_committed

    @functools.wraps(original)
    async def seek_to_committed(self) -> Any:
        committed = await original(self)
        if self.app.conf.consumer_auto_offset_reset == "earliest":
            changelogs = self.app.tables.changelog_topics
            uncommitted = [
                tp for tp, offset in committed.items() if not offset and tp.topic not in changelogs
            ]
            if uncommitted:  # offset 0 too: aiokafka does not seek to it either
                await self.seek_wait(await self.earliest_offsets(*uncommitted))
        return committed

    seek_to_committed._instructrec_shim = True
    ThreadDelegateConsumer.seek_to_committed = seek_to_committed


def flush_the_whole_buffer() -> None:
    """Install the producer-buffer flush patch (process-wide, idempotent): see the module docstring."""
    from faust.transport.producer import ProducerBuffer

    if getattr(ProducerBuffer.flush, "_instructrec_shim", False):
        return
    queue, send, faust_flush = ProducerBuffer.put, ProducerBuffer._send_pending, ProducerBuffer.flush

    @functools.wraps(queue)
    def put(self, fut) -> None:
        self._instructrec_queued = getattr(self, "_instructrec_queued", 0) + 1
        queue(self, fut)

    @functools.wraps(send)
    async def _send_pending(self, fut) -> None:
        await send(self, fut)  # one that fails crashes the buffer, and a flush then raises
        self._instructrec_handed_over = getattr(self, "_instructrec_handed_over", 0) + 1

    async def flush(self) -> None:
        """Wait until every message queued before the flush began is handed over (the buffer's sender takes
        them in order); later ones are not waited for, so a busy producer cannot hold a commit off."""
        if self.app is not None and self.app.conf.producer_threaded:
            return await faust_flush(self)  # its sender is another thread's loop
        queued, waits = getattr(self, "_instructrec_queued", 0), 0
        while getattr(self, "_instructrec_handed_over", 0) < queued:
            if self.state != "running":
                raise RuntimeError("Cannot flush: Producer not Running")  # as Faust's own flush
            self.message_sent.clear()
            try:
                await asyncio.wait_for(self.message_sent.wait(), timeout=0.1)
            except TimeoutError:  # where Faust's flush would have returned: look again
                waits += 1
        if waits:
            log.debug("producer flush waited %d x 0.1 s for the buffer to hand its messages over", waits)

    flush._instructrec_shim = True
    ProducerBuffer.put = put
    ProducerBuffer._send_pending = _send_pending
    ProducerBuffer.flush = flush


def _max_wait_ms(request) -> int:
    """The fetch's max wait: aiokafka's FetchRequest builder keeps it private; a built struct has it public."""
    return int(getattr(request, "_max_wait_ms", None) or getattr(request, "max_wait_time", 0) or 0)


def _empty(response) -> bool:
    """No records and no error in any partition of a fetch response (the records are each entry's last field)."""
    topics = getattr(response, "topics", None)
    if topics is None:
        return False
    return all(
        not partition[-1] and partition[1] == 0 for _, partitions in topics for partition in partitions
    )


@contextlib.contextmanager
def processing(event: Any) -> Iterator[None]:
    """Make `event` Faust's current event while its table reads and writes run (see the module docstring).

    Faust keeps the current event in a context variable of the agent's task; setting it here touches only
    this task, and the previous value is restored on exit.
    """
    from faust.streams import _current_event

    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


async def refresh_metadata(consumer: Any) -> None:
    """Ask the broker for fresh cluster metadata (see the module docstring)."""
    await consumer._client.force_metadata_update()


def hide_sasl_tokens() -> None:
    """Install the log filter (process-wide, idempotent): see the module docstring."""
    logger = logging.getLogger("aiokafka.conn")
    if not any(isinstance(f, _HideSaslTokens) for f in logger.filters):
        logger.addFilter(_HideSaslTokens())


class _HideSaslTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(map(_sasl_exchange, record.args)):
            record.args = tuple(
                "<SASL authentication, hidden>" if _sasl_exchange(arg) else arg for arg in record.args
            )
        return True


def _sasl_exchange(value: Any) -> bool:
    return getattr(value, "API_KEY", None) == _SASL_AUTHENTICATE
