"""Batch job: a dataset's catalogue as item events (the catalog agent embeds and indexes them).

Each item is sent with the text the offline text retriever embeds (`item_text`: title and year, genres,
frequent tags), its display title (what instructions show), its genres as categories and its year as an
attribute. Event ids are derived from the dataset and item, so indexing twice sends the same events.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from instructrec.config import KafkaSettings
from instructrec.data.dataset import Dataset, Item, item_text
from instructrec.events import ItemEvent
from streams.kafka.producer import EventProducer

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "instructrec/index")


def item_event(dataset_name: str, item: Item, ts: float | None = None) -> ItemEvent:
    attributes: dict[str, str | int] = {}
    if item.year is not None:
        attributes["year"] = item.year
    if item.tags:
        attributes["tags"] = ", ".join(item.tags[:5])[:1024]
    return ItemEvent(
        event_id=uuid.uuid5(_NAMESPACE, f"{dataset_name}/{item.id}").hex,
        ts=ts if ts is not None else time.time(),
        item_id=item.id,
        title=item.display_title,
        text=item_text(item),
        categories=tuple(dict.fromkeys(item.genres)),
        attributes=attributes,
    )


def item_events(dataset: Dataset, items: Sequence[Item] | None = None) -> Iterator[ItemEvent]:
    now = time.time()
    for item in items if items is not None else dataset.items:
        yield item_event(dataset.name, item, now)


async def index_dataset(
    kafka: KafkaSettings, dataset: Dataset, *, limit: int | None = None, progress: bool = True
) -> int:
    """Send the catalogue (its first `limit` items) to the items topic; returns how many were sent."""
    items = dataset.items[:limit] if limit else dataset.items
    columns = (TextColumn("index {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    async with EventProducer(kafka) as producer:
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task(dataset.name, total=len(items))
            for event in item_events(dataset, items):
                await producer.send(event)
                bar.advance(task)
    return len(items)
