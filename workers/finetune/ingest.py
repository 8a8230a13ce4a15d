"""From the stream's events to training examples: what each message teaches, decided without I/O.

Two sources, both read in the worker's own consumer group:
- `feedback` (the clicks agent joins a click with the answer it followed): the served candidates, the request's
  text, the chosen item and the items served above it that the user passed over. It says what the user chose
  *among what the model showed*, the reranker's own task — so it weighs more (`feedback_weight`).
- `clicks`: every interaction, most of them never in a served list. Each becomes a next-item example the way
  offline training makes them: the user's history before it (kept per user in the store), the plan's
  candidates (at training time), a synthesised request.

A click that the feedback topic also reports (it names a request) is still a clicks example: the two teach
different tasks (choose among the plan's candidates; choose among what was served).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from instructrec.events import ClickEvent, EventError, FeedbackEvent, decode
from workers.finetune.store import Batch, Example, merge_history

# Interactions that say the user wanted the item (a dislike or a low rating is not a next-item target).
POSITIVE_KINDS = frozenset({"click", "purchase", "rating", "review"})
LOW_RATING = 2.0
HISTORY_SHOWN = 50  # history items an example keeps (instructions show 10; the plan reads more)


def ingest(
    records: Iterable,
    *,
    clicks_topic: str,
    feedback_topic: str,
    history_of: Callable[[str], list[str]],
    history_size: int,
    since_ts: float = 0.0,
) -> tuple[Batch, int]:
    """The examples, history updates and next positions of a poll's records (`record.topic`, `.partition`,
    `.offset`, `.value`); returns them with how many records were not valid events (skipped: the stream's
    agents dead-letter them). Interactions before `since_ts` update histories but make no example."""
    batch = Batch()
    invalid = 0
    for record in records:
        batch.positions[(record.topic, record.partition)] = record.offset + 1
        try:
            if record.topic == clicks_topic:
                click = decode(ClickEvent, record.value)
                _click(batch, click, history_of, history_size, teach=click.ts >= since_ts)
            elif record.topic == feedback_topic:
                feedback = decode(FeedbackEvent, record.value)
                if feedback.ts >= since_ts:
                    _feedback(batch, feedback, history_of)
        except EventError:
            invalid += 1
    return batch, invalid


def _history(batch: Batch, user: str, history_of: Callable[[str], list[str]]) -> list[str]:
    if user not in batch.histories:
        batch.histories[user] = list(history_of(user))
    return batch.histories[user]


def _click(batch: Batch, click: ClickEvent, history_of, history_size: int, teach: bool) -> None:
    history = _history(batch, click.user_id, history_of)
    wanted = (
        teach
        and click.kind in POSITIVE_KINDS
        and not (click.rating is not None and click.rating <= LOW_RATING)
    )
    if wanted and history and click.item_id not in history:
        batch.examples.append(
            Example(click.user_id, tuple(history[-HISTORY_SHOWN:]), click.item_id, click.ts, "clicks")
        )
    batch.histories[click.user_id] = merge_history(history, click.item_id, history_size)


def _feedback(batch: Batch, feedback: FeedbackEvent, history_of) -> None:
    if not feedback.positive_item_ids:
        return  # a dislike alone names nothing to rank first
    target = feedback.positive_item_ids[0]
    history = [i for i in _history(batch, feedback.user_id, history_of) if i != target]
    batch.examples.append(
        Example(
            feedback.user_id,
            tuple(history[-HISTORY_SHOWN:]),
            target,
            feedback.ts,
            "feedback",
            text=feedback.intention,
            candidates=feedback.candidate_item_ids,
            negatives=feedback.negative_item_ids,
            model_version=feedback.model_version,
        )
    )
