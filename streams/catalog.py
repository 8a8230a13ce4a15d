"""The catalog agent: item events → MiniLM text vectors (+ collaborative vectors for items the trained
retriever knows) → Qdrant, in batches.

Embedding dominates (≈ 270 item texts/s on this CPU), so items are taken in batches of up to
`CATALOG_BATCH` and embedded in one call. A batch is acknowledged only after Qdrant has it: if Qdrant stays
down through `UPSERT_ROUNDS` rounds of retries, its items go to the dead-letter topic with the reason
rather than being dropped silently, and the agent moves on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from instructrec.events import EventError, ItemEvent, decode
from instructrec.qdrant import IndexedItem, IndexUnavailable
from streams.services import ItemInfo

if TYPE_CHECKING:
    from streams.app import StreamApp

log = logging.getLogger(__name__)

CATALOG_BATCH = 128
CATALOG_WINDOW_S = 0.5
UPSERT_ROUNDS = 5
ROUND_PAUSE_S = 1.0


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
    written = await services.index.upsert(indexed)
    for item in indexed:
        services.items.put(item.item_id, ItemInfo(item.title, item.categories, item.year))
    stream.metrics.catalog_items.inc(written)
    return written


async def handle_batch(stream: StreamApp, events: Sequence) -> None:
    stream.metrics.events_in.labels("items").inc(len(events))
    valid: list[tuple[object, ItemEvent]] = []
    for event in events:
        try:
            valid.append((event, decode(ItemEvent, event.value)))
        except EventError as error:
            stream.dead_letters.send_event(event, error)
    if not valid:
        return
    for attempt in range(1, UPSERT_ROUNDS + 1):
        try:
            await index_items(stream, [item for _, item in valid])
            return
        except IndexUnavailable as error:
            if attempt == UPSERT_ROUNDS:
                for event, _ in valid:
                    stream.dead_letters.send_event(event, error)
                return
            log.warning("catalog: Qdrant unavailable (round %d of %d): %s", attempt, UPSERT_ROUNDS, error)
            await asyncio.sleep(ROUND_PAUSE_S * attempt)
        except Exception as error:  # a bug or a bad item: record it, keep the agent alive
            for event, _ in valid:
                stream.dead_letters.send_event(event, error)
            return


def install(stream: StreamApp) -> None:
    async def catalog(events_stream):
        async for events in events_stream.take_events(CATALOG_BATCH, within=CATALOG_WINDOW_S):
            await handle_batch(stream, events)

    stream.app.agent(stream.topics.items, name="catalog")(catalog)
