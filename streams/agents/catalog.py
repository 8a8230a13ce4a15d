"""The catalog agent: item events → MiniLM text vectors (+ collaborative vectors for items the trained
retriever knows) → Qdrant, in batches.

Embedding dominates the cost (`benchmarks/stream.py` times the catalogue build), so items are taken in
batches of up to `CATALOG_BATCH` and embedded in one call. A batch is acknowledged only after Qdrant has it:
the write rides out an outage under `CATALOG_RETRY` (the adapters' one retry policy, with a longer budget
than a query can wait for); if Qdrant stays down through it, the batch's items go to the dead-letter topic
with the reason rather than being dropped silently, and the agent moves on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from instructrec.adapters.qdrant import IndexedItem
from instructrec.adapters.retry import RetryPolicy
from instructrec.events import ItemEvent
from streams.services import ItemInfo

if TYPE_CHECKING:
    from streams.app import StreamApp

log = logging.getLogger(__name__)

CATALOG_BATCH = 128
CATALOG_WINDOW_S = 0.5
CATALOG_RETRY = RetryPolicy(retries=8, base_s=0.25, cap_s=8.0)  # up to about half a minute of outage


def item_year(event: ItemEvent) -> int | None:
    year = event.attributes.get("year")
    return year if isinstance(year, int) and not isinstance(year, bool) else None


def embedding_text(event: ItemEvent) -> str:
    """What the text vector encodes: the producer's text when it sent one (the index job sends the text the
    offline text retriever embeds), else the title and categories in the same shape."""
    if event.text.strip():
        return event.text
    text = f"{event.title}."
    if event.categories:
        text += f" Genres: {', '.join(event.categories)}."
    return text


async def index_items(stream: StreamApp, items: Sequence[ItemEvent]) -> int:
    """Embed and upsert items (the last event of an item wins); returns how many were written."""
    latest = list({item.item_id: item for item in items}.values())
    if not latest:
        return 0
    services = stream.services
    vectors = await services.run_model(services.encoder.encode, [embedding_text(i) for i in latest])
    collaborative = services.collaborative
    indexed = [
        IndexedItem(
            item_id=item.item_id,
            title=item.title,
            categories=item.categories,
            year=item_year(item),
            text_vector=vectors[row],
            cf_vector=collaborative.vector_of(item.item_id) if collaborative is not None else None,
        )
        for row, item in enumerate(latest)
    ]
    written = await services.index.upsert(indexed, CATALOG_RETRY)
    for item in indexed:
        services.items.put(item.item_id, ItemInfo(item.title, item.categories, item.year))
    stream.metrics.catalog_items.inc(written)
    return written


async def handle_batch(stream: StreamApp, events: Sequence) -> None:
    stream.metrics.events_in.labels("items").inc(len(events))
    valid: list[tuple[object, ItemEvent]] = []
    for event in events:
        item = stream.dead_letters.admit(event, ItemEvent)
        if item is not None:
            valid.append((event, item))
    if not valid:
        return
    try:
        await index_items(stream, [item for _, item in valid])
    except Exception as error:  # Qdrant down through every retry, a bug or a bad item: record it, go on
        for event, _ in valid:
            stream.dead_letters.send_event(event, error)


def install(stream: StreamApp) -> None:
    async def catalog(events_stream):
        async for events in events_stream.take_events(CATALOG_BATCH, within=CATALOG_WINDOW_S):
            await handle_batch(stream, events)

    stream.app.agent(stream.topics.items, name="catalog")(catalog)
