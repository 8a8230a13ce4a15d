"""The demo's live terminal dashboard. `Dashboard` is plain state: the demo's tasks feed it what they see (a
query sent, an answer read back from `recommendations`, a verdict from `model-updates`, the worker's `GET /live`
figures, the fine-tune store's counts) and `render()` draws it; nothing here does I/O."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from instructrec.events import ModelUpdate, QueryEvent, Recommendation

WINDOW_S = 60.0  # rates and latency quantiles are over the last minute
SHOWN = 3  # latest recommendations shown


@dataclass
class Answered:
    query: QueryEvent
    answer: Recommendation
    ms: float


@dataclass
class Dashboard:
    started: float = field(default_factory=time.monotonic)
    phase: str = "starting"
    sent: int = 0
    answered: int = 0
    degraded: int = 0
    _asked: dict[str, tuple[float, QueryEvent]] = field(default_factory=dict)
    _sent_at: deque[float] = field(default_factory=deque)
    _latency: deque[tuple[float, float]] = field(default_factory=deque)  # (when answered, ms)
    recent: deque[Answered] = field(default_factory=lambda: deque(maxlen=SHOWN))
    verdicts: list[ModelUpdate] = field(default_factory=list)
    live: dict = field(default_factory=dict)  # the worker's GET /live
    store: dict = field(default_factory=dict)  # the fine-tune store: examples, cycle running

    # -- what the demo's tasks report

    def on_sent(self, event: object, now: float) -> None:
        self.sent += 1
        self._sent_at.append(now)
        if isinstance(event, QueryEvent):
            self._asked[event.request_id] = (now, event)
        self._trim(now)

    def on_answer(self, answer: Recommendation, now: float) -> None:
        asked = self._asked.pop(answer.request_id, None)
        if asked is None:
            return  # not one of this demo's queries (POST /recommend answers are shown apart)
        ms = (now - asked[0]) * 1000
        self.answered += 1
        self.degraded += answer.degraded
        self._latency.append((now, ms))
        if asked[1].text or not any(a.query.text for a in self.recent):
            self.recent.append(
                Answered(asked[1], answer, ms)
            )  # requests with a text are the instructive ones
        self._trim(now)

    def on_update(self, update: ModelUpdate) -> None:
        if update.kind in ("verdict", "rollback"):
            self.verdicts.append(update)

    def _trim(self, now: float) -> None:
        while self._sent_at and self._sent_at[0] < now - WINDOW_S:
            self._sent_at.popleft()
        while self._latency and self._latency[0][0] < now - WINDOW_S:
            self._latency.popleft()

    # -- figures

    def rate(self, now: float) -> float:
        recent = [t for t in self._sent_at if t >= now - WINDOW_S]
        span = min(WINDOW_S, now - self.started)
        return len(recent) / span if span > 0 else 0.0

    def latency(self) -> tuple[float, float] | None:
        if not self._latency:
            return None
        values = np.array([ms for _, ms in self._latency])
        return float(np.percentile(values, 50)), float(np.percentile(values, 99))

    @property
    def unanswered(self) -> int:
        return len(self._asked)

    def line(self, now: float) -> str:
        """One line for a log (no terminal to redraw)."""
        latency = self.latency()
        figures = f"p50 {latency[0]:.0f} ms, p99 {latency[1]:.0f} ms" if latency else "no answers yet"
        quality = ", ".join(
            f"v{r['version']} NDCG@10 {r['ndcg10']:.3f} ({r['answers']})"
            for r in self.live.get("prequential", [])
        )
        return (
            f"[{_clock(now - self.started)}] {self.phase}: sent {self.sent} ({self.rate(now):.0f}/s), answered "
            f"{self.answered} ({figures}); model v{self.live.get('model_version', '?')}; "
            f"examples {self.store.get('examples', 0)}; verdicts {len(self.verdicts)}"
            + (f"; {quality}" if quality else "")
        )

    # -- drawing

    def render(self, now: float) -> Group:
        return Group(self._header(now), self._stream(now), self._recommendations(), self._learning())

    def _header(self, now: float) -> Panel:
        title = Text.assemble(
            ("InstructRec Stream", "bold"),
            " · live demo · ",
            (_clock(now - self.started), "cyan"),
            " · ",
            (self.phase, "yellow"),
        )
        return Panel(title, expand=True)

    def _stream(self, now: float) -> Table:
        table = Table(title="the stream", title_justify="left", expand=True, show_header=False, box=None)
        table.add_column(style="dim", width=22)
        table.add_column()
        latency = self.latency()
        per_topic = (self.live.get("events_per_s") or {}) if self.live else {}
        consumed = " · ".join(f"{topic} {rate:.0f}" for topic, rate in sorted(per_topic.items()) if rate)
        table.add_row("events sent", f"{self.sent:,} ({self.rate(now):.0f}/s over the last minute)")
        table.add_row("consumed by the worker", f"{consumed or '—'} per s")
        table.add_row(
            "queries answered",
            f"{self.answered:,} · {self.degraded} degraded · {self.unanswered} in flight",
        )
        table.add_row(
            "latency (sent → answer)",
            f"p50 {latency[0]:.0f} ms · p99 {latency[1]:.0f} ms" if latency else "—",
        )
        circuit = self.live.get("circuit", "?") if self.live else "?"
        table.add_row(
            "served model", f"version {self.live.get('model_version', '?')} · reranker circuit {circuit}"
        )
        return table

    def _recommendations(self) -> Table:
        table = Table(title="latest recommendations", title_justify="left", expand=True)
        table.add_column("request", ratio=2)
        table.add_column("top items, with their reasons", ratio=5)
        table.add_column("ms", justify="right", width=6)
        for shown in reversed(self.recent):
            query, answer = shown.query, shown.answer
            items = Text()
            for rank, item in enumerate(answer.items[:5], 1):
                items.append(f"{rank}. {item.title or item.item_id}")
                if item.reasons:
                    items.append(f"  ({'; '.join(item.reasons[:2])})", style="dim")
                items.append("\n")
            if answer.instruction:
                items.append(_cut(answer.instruction, 220), style="italic dim")
            request = Text(f"user {query.user_id}\n", style="dim")
            request.append(f"“{query.text}”" if query.text else "(no text: what next?)")
            request.append(
                f"\nv{answer.model_version}" + (" · degraded" if answer.degraded else ""), style="dim"
            )
            table.add_row(request, items, f"{shown.ms:.0f}")
        if not self.recent:
            table.add_row("—", "waiting for the first answer", "")
        return table

    def _learning(self) -> Group:
        quality = Table(
            title="prequential quality: each answer against the user's next click", title_justify="left"
        )
        for column in ("version", "NDCG@10", "HR@10", "answers"):
            quality.add_column(column, justify="right")
        for row in self.live.get("prequential", []) if self.live else []:
            quality.add_row(
                str(row["version"]), f"{row['ndcg10']:.4f}", f"{row['hr10']:.4f}", str(row["answers"])
            )
        cycles = Table(title="fine-tune worker", title_justify="left", expand=True)
        cycles.add_column("version", width=14)
        cycles.add_column("verdict")
        state = "a cycle is training" if self.store.get("running") else "waiting for examples"
        cycles.caption = f"{self.store.get('examples', 0):,} examples stored · {state}"
        for update in self.verdicts[-4:]:
            cycles.add_row(update.version, _verdict(update))
        if not self.verdicts:
            cycles.add_row("—", "no cycle finished yet")
        return Group(quality, cycles)


def _verdict(update: ModelUpdate) -> Text:
    if update.kind == "rollback":
        return Text(f"rolled back to version {update.version}", style="yellow")
    m = update.metrics
    figures = ""
    if "candidate_ndcg@10" in m:
        figures = (
            f" · NDCG@10 {m['incumbent_ndcg@10']:.4f} → {m['candidate_ndcg@10']:.4f} on {m.get('judged', 0):.0f} "
            f"held-out examples · trained on {m.get('examples', 0):.0f}"
        )
    if update.accepted:
        return Text(f"accepted, now serving (over v{update.incumbent}){figures}", style="green")
    return Text(f"rejected: {_cut(update.reason or '', 90)}{figures}", style="red")


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"
