"""A compatibility shim for brokers that answer an offset commit made during a rebalance with
ILLEGAL_GENERATION (noida-db, the local broker) where Kafka answers REBALANCE_IN_PROGRESS.

Why it matters: when a worker leaves the group, the survivor's next periodic commit races the rebalance.
On ILLEGAL_GENERATION aiokafka forgets its member id and rejoins as a new member; noida-db then keeps the
old id as a phantom member and never completes the rebalance — the survivor is stuck with no partitions,
re-joining every rebalance timeout (reproduced with two plain aiokafka consumers, no Faust). Read as Kafka's
REBALANCE_IN_PROGRESS, the same answer makes aiokafka rejoin with its member id, and the group settles in
a heartbeat.

It is safe against a real Kafka: a member whose generation is truly stale rejoins with its old id, the
coordinator answers UNKNOWN_MEMBER_ID, and aiokafka resets then — one extra round trip. The commit itself
still fails either way (at-least-once: its events are delivered again and absorbed as duplicates).
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

ILLEGAL_GENERATION = 22
REBALANCE_IN_PROGRESS = 27
_OFFSET_COMMIT = 8  # Kafka API key


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
            response.topics = [(topic, [_translated(p) for p in partitions]) for topic, partitions in response.topics]
        return response

    _send_req._instructrec_shim = True
    GroupCoordinator._send_req = _send_req


def _translated(partition: tuple) -> tuple:
    number, error_code, *rest = partition
    if error_code == ILLEGAL_GENERATION:
        log.info("offset commit during a rebalance answered ILLEGAL_GENERATION: rejoining with the same member id")
        return (number, REBALANCE_IN_PROGRESS, *rest)
    return partition
