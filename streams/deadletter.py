"""The dead-letter path: an event an agent cannot process goes to the dead-letter topic, with the reason and
the source topic, partition and offset, and the agent carries on with the next event.

Dead letters are queued on the app's producer like every other output (no await), so an agent that fails
one event of a micro-batch neither blocks on nor loses the rest of the batch.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, TypeVar

from instructrec.events import DeadLetter, Event, EventError, ItemEvent, dead_letter, decode, encode
from streams.metrics import Metrics

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)


class Sender(Protocol):
    def send_soon(self, *, key: Any = None, value: Any = None, **kwargs: Any) -> Any: ...


class DeadLetters:
    def __init__(self, topic: Sender, metrics: Metrics) -> None:
        self.topic = topic
        self.metrics = metrics

    def send(
        self,
        source_topic: str,
        partition: int | None,
        offset: int | None,
        raw: bytes | str | None,
        error: BaseException | str,
    ) -> DeadLetter:
        letter = dead_letter(source_topic, partition, offset, raw, error)
        if isinstance(error, EventError):
            log.info("dead letter from %s[%s]@%s: %s", source_topic, partition, offset, letter.error)
        else:  # not the event's fault: worth a traceback in the log
            log.error(
                "dead letter from %s[%s]@%s: %s",
                source_topic,
                partition,
                offset,
                letter.error,
                exc_info=error if isinstance(error, BaseException) else None,
            )
        self.topic.send_soon(key=letter.key.encode(), value=encode(letter))
        self.metrics.dead_letters.labels(source_topic).inc()
        self.metrics.events_out.labels("dead-letter").inc()
        return letter

    def send_event(self, event: Any, error: BaseException | str) -> DeadLetter:
        """A Faust event (its message gives topic, partition, offset and the raw value)."""
        message = event.message
        return self.send(message.topic, message.partition, message.offset, event.value, error)

    def admit(self, event: Any, schema: type[E]) -> E | None:
        """The event decoded as `schema` when it is valid and keyed as its topic is (`Event.key`: the user id,
        or the item id for items); otherwise None, and the event has gone to the dead-letter topic with the
        reason."""
        try:
            record = decode(schema, event.value)
        except EventError as error:
            self.send_event(event, error)
            return None
        problem = key_problem(event.key, record.key, "item_id" if schema is ItemEvent else "user_id")
        if problem:
            self.send_event(event, problem)
            return None
        return record


def key_problem(key: bytes | None, expected: str, field: str = "user_id") -> str | None:
    """Why a message's key is wrong, or None when it is the event's own `field`: a user's events keyed
    otherwise land on a partition its other events and its state never reach; an item's, on one where its
    updates can overtake each other."""
    if key is None:
        return f"no message key: this topic is keyed by {field} ({expected!r})"
    if key != expected.encode():
        return f"message key {key[:64]!r} is not the {field} {expected!r}: this topic is keyed by {field}"
    return None
