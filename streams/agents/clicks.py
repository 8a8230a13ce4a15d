"""The clicks agent: interactions → the user-context table; clicks on a served list → feedback examples.

Clicks arrive in batches; a user's clicks in one batch are folded into the context in order and the record
is written once (a user's events share one partition, so the write goes to that partition's changelog).
A redelivered click (same event id) changes nothing. A click that names the request it followed is joined
with that request's impression (`streams.state.served`) into a `FeedbackEvent` for the fine-tune worker.

User-keyed topics must be keyed by the user id with Kafka's default (murmur2) partitioner: a click keyed
otherwise would update a context that the user's queries never read, so it goes to the dead-letter topic.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from instructrec.events import ClickEvent, encode
from streams.kafka.compat import processing
from streams.state.context import ContextLimits, UserContext
from streams.state.served import Served, feedback_for

if TYPE_CHECKING:
    from streams.app import StreamApp

log = logging.getLogger(__name__)

CLICKS_BATCH = 500
CLICKS_WINDOW_S = 0.05


def handle_batch(stream: StreamApp, events: Sequence) -> int:
    """Apply a batch; returns how many clicks changed a context. Synchronous: no await between a user's read
    and write, so the queries agent (same event loop) never sees half an update."""
    stream.metrics.events_in.labels("clicks").inc(len(events))
    by_user: dict[str, list[tuple[object, ClickEvent]]] = {}
    for event in events:
        click = stream.dead_letters.admit_user_event(event, ClickEvent)
        if click is not None:
            by_user.setdefault(click.user_id, []).append((event, click))

    limits = ContextLimits.from_settings(stream.settings.stream)
    applied = 0
    for user, clicks in by_user.items():
        with processing(clicks[-1][0]):
            try:
                applied += _apply_user(stream, user, clicks, limits)
            except Exception as error:  # a bug must not stop the agent: record the user's clicks, go on
                for event, _ in clicks:
                    stream.dead_letters.send_event(event, error)
    return applied


def _apply_user(stream: StreamApp, user: str, clicks: list, limits: ContextLimits) -> int:
    context = UserContext.from_bytes(stream.tables.context.get(user))
    served: Served | None = None
    applied = 0
    for _, click in clicks:
        if not context.apply(click, limits):
            stream.metrics.duplicates.labels("clicks").inc()
            continue
        applied += 1
        stream.services.popularity.count(click.item_id)
        if click.request_id:
            if served is None:
                served = Served.from_bytes(stream.tables.served.get(user))
            impression = served.impression(click.request_id)
            feedback = feedback_for(click, impression) if impression else None
            if feedback is not None:
                stream.send(stream.topics.feedback, user, encode(feedback), "feedback")
    if applied:
        stream.tables.context[user] = context.to_bytes()
    return applied


def install(stream: StreamApp) -> None:
    async def clicks(events_stream):
        async for events in events_stream.take_events(CLICKS_BATCH, within=CLICKS_WINDOW_S):
            handle_batch(stream, events)

    stream.app.agent(stream.topics.clicks, name="clicks")(clicks)
