"""The agents: plain functions over typed event streams, one module each.

- `catalog`: item events → text (and collaborative) vectors → Qdrant;
- `clicks`: interactions → the user-context table; clicks on a served list → feedback;
- `queries`: a query → context → candidates → instruction → Triton → a recommendation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from streams.agents import catalog, clicks, queries

if TYPE_CHECKING:
    from streams.app import StreamApp


def install(stream: StreamApp) -> None:
    catalog.install(stream)
    clicks.install(stream)
    queries.install(stream)
