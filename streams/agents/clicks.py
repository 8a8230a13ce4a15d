"""The clicks agent: interactions → the user-context table; clicks on a served list → feedback examples; and
every answer scored against the user's next interaction (prequential quality per model version).

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

from instructrec.events import ClickEvent, ModelUpdate, encode
from streams.kafka.compat import processing
from streams.state.context import ContextLimits, UserContext
from streams.state.prequential import answer_metrics
from streams.state.served import Impression, Served, feedback_for

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
        click = stream.dead_letters.admit(event, ClickEvent)
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
    served = Served.from_bytes(stream.tables.served.get(user))
    applied = scored = 0
    for _, click in clicks:
        if not context.apply(click, limits):
            stream.metrics.duplicates.labels("clicks").inc()
            continue
        applied += 1
        stream.services.popularity.count(click.item_id)
        if click.request_id:
            impression = served.impression(click.request_id)
            feedback = feedback_for(click, impression) if impression else None
            if feedback is not None:
                stream.send(stream.topics.feedback, user, encode(feedback), "feedback")
        judged = served.to_score(click.ts, click.request_id)
        if judged is not None:
            _score(stream, judged, click)
            served.mark_scored(judged.request_id)
            scored += 1
    if applied:
        stream.tables.context[user] = context.to_bytes()
    if scored:
        stream.tables.served[user] = served.to_bytes()
    return applied


def _score(stream: StreamApp, impression: Impression, click: ClickEvent) -> None:
    """The answer against what the user went on to choose, into the rolling per-version figures."""
    version = impression.model_version or "unknown"
    ndcg, hit = answer_metrics(impression.served, click.item_id)
    due = stream.prequential.record(version, ndcg, hit)
    summary = stream.prequential.summary(version)
    stream.metrics.prequential_ndcg.labels(version).set(summary["ndcg@10"])
    stream.metrics.prequential_hr.labels(version).set(summary["hr@10"])
    stream.metrics.prequential_answers.labels(version).inc()
    if due:
        update = ModelUpdate(version=version, metrics=summary, accepted=True, kind="prequential")
        stream.send(stream.topics.model_updates, version, encode(update), "model-updates")


def install(stream: StreamApp) -> None:
    async def clicks(events_stream):
        async for events in events_stream.take_events(CLICKS_BATCH, within=CLICKS_WINDOW_S):
            handle_batch(stream, events)

    stream.app.agent(stream.topics.clicks, name="clicks")(clicks)
