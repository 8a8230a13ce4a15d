"""The queries agent: a query → the user's context → the candidate plan (`instructrec.candidates`: the
collaborative retriever in-process, the request's text searched in Qdrant, its constraints applied) → the
InstructRec instruction → the reranker on Triton → a `Recommendation` whose items carry their reasons.

Queries are micro-batched (`stream.take_events(batch_size, within=batch_window_s)`): a batch shares one
embedding call and one hop to the Qdrant thread, and its Triton requests go out together; each query is
answered as soon as its own scores are back; up to `query_concurrency` batches are in flight (`install`).
Within a batch each query is handled on its own: an invalid query becomes a dead letter, so does one over
its user's rate (`streams.ratelimit`), a redelivered one (its request id is in the served log) is skipped,
and every other query gets exactly one answer, published together with the served-log update (see
`streams.served`). Nothing drops a query silently:
- reranker down, slow or its circuit open → the candidates in the plan's order, `degraded` with the reason;
- Qdrant down (after retries) → the plan without its text search (the collaborative retriever and the
  request's constraints still apply), else the collaborative neighbours of the user's recent items, else
  popularity, `degraded`;
- no history and no text (cold start) → popularity, `degraded`;
- anything unexpected → a dead letter for the query *and* an empty degraded answer, so a caller waiting on
  the request id hears back at once.

Item ids are strings in the stream; the instruction renderer numbers a request's items locally
(`LocalItems`), and `encode_request` turns them back into ids, titles and descriptions for the wire.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from instructrec.adapters.qdrant import TEXT, IndexUnavailable
from instructrec.candidates import (
    Candidate,
    CandidateFilter,
    Hit,
    Plan,
    PlanRequest,
    Prepared,
    collaborative_scores,
    merge,
    neighbour,
    prepare,
    reasons,
    sizes,
)
from instructrec.events import MAX_INSTRUCTION_CHARS, QueryEvent, RankedItem, Recommendation, encode
from instructrec.instructions import Instruction, request_instruction
from instructrec.serving.wire import encode_request
from streams.kafka.compat import processing
from streams.ratelimit import RateLimited, UserRateLimiter
from streams.services import ItemInfo, Services
from streams.state.context import UserContext
from streams.state.served import Impression, Served

if TYPE_CHECKING:
    from streams.app import StreamApp

log = logging.getLogger(__name__)

NO_MODEL = "retrieval"  # model_version of an answer the reranker did not order
NO_TEMPLATE = "none"  # template_id of an answer without an instruction
EXPLICIT_WINDOW = 100  # history items whose ratings and words feed explicit preferences (as in training)


class LocalItems:
    """Request-local dense ints for item ids (the instruction layer works on ints)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._index: dict[str, int] = {}

    def index(self, item_id: str) -> int:
        found = self._index.get(item_id)
        if found is None:
            found = self._index[item_id] = len(self.ids)
            self.ids.append(item_id)
        return found


@dataclass
class Pending:
    """One query on its way through a batch."""

    event: Any  # the Faust event
    query: QueryEvent
    context: UserContext
    flt: CandidateFilter
    rerank_n: int
    fetch_n: int
    queue_ms: float
    intention: np.ndarray | None = None
    history: np.ndarray | None = None  # the collaborative query vector of the user's recent items
    prior: np.ndarray | None = None  # the pipeline retriever's scores of the catalogue (the plan's source)
    rows: list[int] = field(default_factory=list)  # the user's recent items as catalogue rows
    prepared: Prepared | None = None
    plan: Plan | None = None
    candidates: list[Candidate] = field(default_factory=list)  # the plan's, best first
    version: str = ""  # the model version that scored it
    reasons: list[str] = field(default_factory=list)  # why the answer is degraded (empty: it is not)
    instruction: Instruction | None = None
    items: LocalItems = field(default_factory=LocalItems)
    request: bytes | None = None
    scores: np.ndarray | None = None

    def degrade(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)


def candidate_filter(query: QueryEvent, context: UserContext) -> CandidateFilter:
    f = query.filters
    excluded = set(f.exclude_item_ids)
    if f.exclude_seen:
        excluded |= context.consumed()
    return CandidateFilter(
        categories=frozenset(f.categories),
        exclude_categories=frozenset(f.exclude_categories),
        year_min=f.year_min,
        year_max=f.year_max,
        exclude_ids=frozenset(excluded),
    )


def fallback(
    services: Services, query_vector: np.ndarray | None, k: int, flt: CandidateFilter
) -> tuple[list[Candidate], str]:
    """Candidates without a plan (no trained catalogue and no Qdrant): the collaborative neighbours of the
    user's recent items, else popularity. Returns them and which source answered."""
    info: Callable[[str], ItemInfo | None] = services.items.get
    collaborative = services.collaborative
    if collaborative is not None and query_vector is not None:
        pairs, source = collaborative.neighbours(query_vector, k, flt, info), "recent-item neighbours"
    else:
        pairs, source = services.popularity.top(k, flt, info), "popularity"
    out = []
    for item, score in pairs:
        known = info(item)
        title = known.title if known else ""
        categories = known.categories if known else ()
        out.append(
            Candidate(item, score, None, None, ("popular",), title, categories, known.year if known else None)
        )
    return out, source


def request_seed(request_id: str) -> int:
    """A stable seed per request: the same query renders the same instruction in every process."""
    return zlib.crc32(request_id.encode())


# ------------------------------------------------------------------------------------------------ intake


def intake(
    stream: StreamApp, events: Sequence, now: float, limiter: UserRateLimiter | None = None
) -> list[Pending]:
    """Decode, check, deduplicate, rate-limit and read each query's context (synchronous: table reads).

    A query over its user's rate becomes a dead letter with the reason; a redelivery is not counted again.
    """
    settings = stream.settings
    pending: list[Pending] = []
    for event in events:
        query = stream.dead_letters.admit(event, QueryEvent)
        if query is None:
            continue
        with processing(event):
            served = Served.from_bytes(stream.tables.served.get(query.user_id))
            if served.has_answered(query.request_id) or query.request_id in stream.in_flight:
                stream.metrics.duplicates.labels("queries").inc()
                log.info("query %s is answered or being answered: skipping the redelivery", query.request_id)
                continue
            if limiter is not None and not limiter.allow(query.user_id):
                stream.dead_letters.send_event(event, RateLimited(limiter.refusal(query.user_id)))
                continue
            stream.in_flight.add(query.request_id)
            context = UserContext.from_bytes(stream.tables.context.get(query.user_id))
            if query.text:
                context.note_intention(query.text, query.ts)
                stream.tables.context[query.user_id] = context.to_bytes()
        rerank_n, fetch_n = sizes(query.k, settings.model.candidates)
        sent_at = event.message.timestamp or now
        pending.append(
            Pending(
                event,
                query,
                context,
                candidate_filter(query, context),
                rerank_n,
                fetch_n,
                queue_ms=max(0.0, (now - sent_at) * 1000),
            )
        )
    return pending


# -------------------------------------------------------------------------------------------- the stages


async def embed(stream: StreamApp, batch: list[Pending]) -> None:
    """Intention vectors (MiniLM), collaborative history vectors and the retriever's scores of the catalogue
    (the plan's collaborative source), in one hop to the model thread."""
    services = stream.services
    texts = [p.query.text for p in batch if p.query.text]
    histories = [p.context.recent(stream.settings.stream.history_size) for p in batch]

    def run():
        vectors = services.intentions.encode(texts) if texts else None
        collaborative = services.collaborative
        if collaborative is None:
            return vectors, [None] * len(batch), [None] * len(batch)
        history = collaborative.query_vectors(histories)
        return vectors, history, collaborative.catalogue_scores(histories, history)

    try:
        vectors, history, priors = await services.run_model(run)
    except Exception as error:  # a model failure degrades the answer, it does not lose it
        log.exception("embedding failed")
        for p in batch:
            p.degrade(f"embedding failed: {type(error).__name__}")
        return
    rows = iter(vectors if vectors is not None else ())
    for p, vector, prior in zip(batch, history, priors, strict=True):
        p.intention = next(rows) if p.query.text else None
        p.history = vector
        p.prior = prior


async def retrieve(stream: StreamApp, batch: list[Pending]) -> None:
    """The candidate plan for every query: what each asks and the filter that holds it, one hop to Qdrant for
    the batch's text searches, then the merge with the collaborative scores (in-process)."""
    services = stream.services
    catalogue, config = services.catalogue, services.plan
    searches: list[tuple[int, str, np.ndarray]] = []  # (query, what the search is by, vector)
    for i, p in enumerate(batch):
        collaborative = services.collaborative
        p.rows = (
            collaborative.known(p.context.recent(stream.settings.stream.history_size))
            if collaborative
            else []
        )
        request = PlanRequest(tuple(p.rows), p.query.text, p.flt, p.fetch_n)
        p.prepared = prepare(request, catalogue, config)
        search = p.prepared.search(p.intention, config)
        if search is not None:
            searches.append((i, "intention", search.vector))
        elif p.history is None and p.context.history and not len(catalogue):
            vector = await _history_text_vector(stream, p)  # untrained: the history's mean text vector
            if vector is not None:
                searches.append((i, "history", vector))
    results = iter(
        await services.index.search_many(
            [(TEXT, v, config.fetch, batch[i].prepared.filter) for i, _, v in searches]
        )
        if searches
        else ()
    )
    found: dict[int, tuple[str, list[Hit]]] = {}
    for i, why, _ in searches:
        result = next(results)
        if isinstance(result, IndexUnavailable):
            batch[i].degrade(f"qdrant unavailable ({result}); the plan without its {why} search")
            found[i] = (why, [])
        else:
            found[i] = (why, result)
            for hit in result:
                services.items.put_hit(hit)
    for i, p in enumerate(batch):
        _merge(stream, p, *found.get(i, ("intention", [])))


def _merge(stream: StreamApp, p: Pending, why: str, hits: list[Hit]) -> None:
    services = stream.services
    catalogue = services.catalogue
    leaning = None
    if services.affinity is not None and p.intention is not None and p.query.text:
        leaning = services.affinity.of_items(p.intention, catalogue)
    scores, source = collaborative_scores(
        p.prepared,
        catalogue,
        retrieval=p.prior,
        popularity=services.counts,
        affinity=leaning,
        config=services.plan,
    )
    p.plan = merge(
        p.prepared,
        catalogue,
        collaborative=scores,
        source=source,
        hits=hits,
        hits_source=why,
        config=services.plan,
    )
    p.candidates = list(p.plan.candidates)
    cold = not p.context.history and not p.query.text
    if not p.candidates:
        p.candidates, source = fallback(services, p.history, p.fetch_n, p.prepared.filter)
        p.degrade(f"{'cold start: no history and no request text' if cold else 'nothing planned'}; {source}")
    elif cold:
        p.degrade("cold start: no history and no request text; popularity")


async def _history_text_vector(stream: StreamApp, p: Pending) -> np.ndarray | None:
    """Without a trained retriever, a user's recent items are searched by their mean text vector."""
    recent = p.context.recent(10)
    try:
        found = await stream.services.index.lookup(recent, (TEXT,))
    except IndexUnavailable:
        return None  # the search would fail the same way: the plan falls back
    vectors = [found[x][1][TEXT] for x in recent if x in found and TEXT in found[x][1]]
    if not vectors:
        return None
    mean = np.mean(np.stack(vectors), axis=0)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > 0 else None


async def render(stream: StreamApp, batch: list[Pending]) -> None:
    """The instruction for each query with at least two candidates, then its wire request: titles of the
    history through the item cache (the rest in one Qdrant lookup for the batch), candidates as the plan
    describes them, and their collaborative scores as the fusion prior."""
    settings = stream.settings
    for p in batch:
        candidates = p.candidates[: p.rerank_n]
        if len(candidates) < 2 or not (p.context.history or p.query.text):
            continue  # nothing to rank, or nothing to personalise on: the answer is the plan's order
        history = p.context.interactions(p.items.index, EXPLICIT_WINDOW)
        try:
            p.instruction = request_instruction(
                history,
                [p.items.index(c.item_id) for c in candidates],
                intention=p.query.text,
                seed=request_seed(p.query.request_id),
                max_history=settings.model.max_history,
                nouns=stream.services.catalogue.nouns,
            )
        except ValueError as error:
            p.degrade(f"no instruction: {error}")
    await _resolve_titles(stream, batch)
    collaborative = stream.services.collaborative
    for p in batch:
        if p.instruction is None:
            continue
        titles = _titles(stream, p)
        by_id = {c.item_id: c for c in p.candidates}
        texts = [
            by_id[i].text if i in by_id and by_id[i].text else titles[n] for n, i in enumerate(p.items.ids)
        ]
        scores, weight = None, None
        if collaborative is not None and collaborative.weight_for(p.query.text) > 0:
            scores = _fill_unknown([by_id[p.items.ids[c]].prior for c in p.instruction.candidates])
            weight = collaborative.weight_for(p.query.text)
        p.request = encode_request(
            p.instruction,
            p.items.ids.__getitem__,
            titles.__getitem__,
            retrieval_scores=scores,
            fusion_weight=weight,
            text_of=texts.__getitem__,
        )


async def _resolve_titles(stream: StreamApp, batch: list[Pending]) -> None:
    cache, catalogue = stream.services.items, stream.services.catalogue
    wanted = []
    for p in batch:
        if p.instruction is None:
            continue
        for m in p.instruction.mentions():
            item_id = p.items.ids[m.item]
            row = catalogue.rows.get(item_id)
            if row is not None and cache.get(item_id) is None:
                cache.put(
                    item_id, ItemInfo(catalogue.titles[row], catalogue.genres[row], catalogue.year(row))
                )
            wanted.append(item_id)
    missing = cache.missing(wanted)
    if not missing:
        return
    try:
        found = await stream.services.index.lookup(missing)
    except IndexUnavailable as error:
        log.warning("titles unavailable (%s): rendering item ids instead", error)
        return
    for hit, _ in found.values():
        cache.put_hit(hit)


def _titles(stream: StreamApp, p: Pending) -> list[str]:
    titles = []
    for item_id in p.items.ids:
        info = stream.services.items.get(item_id)
        titles.append(info.title if info and info.title else f"item {item_id}")
    return titles


def _fill_unknown(scores: list[float | None]) -> list[float]:
    """Retrieval scores for fusion: an item the retriever does not know gets less than the least known one."""
    known = [s for s in scores if s is not None]
    floor = (min(known) - 1.0) if known else 0.0
    return [floor if s is None else s for s in scores]


async def rerank(stream: StreamApp, p: Pending) -> float:
    """The query's Triton call (a batch's go out together, and Triton's instances and dynamic batcher take
    them side by side); on any failure the query keeps its retrieval order, degraded. Returns the call's
    duration in ms (0 without a request)."""
    if p.request is None:
        return 0.0
    triton = stream.settings.triton
    # The client has its own timeouts, retries and circuit breaker; this bound only guarantees an answer.
    deadline = triton.timeout_s * (triton.retries + 1) + 1.0
    started = time.perf_counter()
    try:
        scored = await asyncio.wait_for(stream.services.reranker.score_with_versions([p.request]), deadline)
        if len(scored) != 1:
            raise RuntimeError(f"{len(scored)} score lists for 1 request")
    except Exception as error:  # unavailable, timed out, circuit open, or a bad answer: degrade, never drop
        p.degrade(f"reranker unavailable: {type(error).__name__}: {error}"[:500])
        _circuit_gauge(stream)
        return (time.perf_counter() - started) * 1000
    _circuit_gauge(stream)
    (row, version), *_ = scored
    scores = np.asarray(row, dtype=np.float64)
    expected = len(p.instruction.candidates) if p.instruction is not None else 0
    if scores.shape != (expected,):  # a model that answers for other items than it was asked about
        p.degrade(f"reranker answered {scores.size} scores for {expected} candidates")
    else:
        p.scores = scores
        p.version = version  # the version that scored this request (a swap may land mid-batch)
    return (time.perf_counter() - started) * 1000


def _circuit_gauge(stream: StreamApp) -> None:
    stream.metrics.reranker_circuit_open.set(1 if stream.services.reranker.circuit_state == "open" else 0)


# ------------------------------------------------------------------------------------------------ answer


def ranked(stream: StreamApp, p: Pending) -> list[RankedItem]:
    """The answer: reranked candidates by model score, topped up (or replaced, if not reranked) by the plan's
    order, every candidate that satisfies the request before those a relaxed request let in; at most k items,
    each with its reasons."""
    order: list[Candidate] = []
    scored: dict[str, float] = {}
    by_id = {c.item_id: c for c in p.candidates}
    if p.instruction is not None and p.scores is not None:
        ids = [p.items.ids[c] for c in p.instruction.candidates]
        for position in np.argsort(-p.scores, kind="stable"):
            item = ids[int(position)]
            order.append(by_id[item])
            scored[item] = float(p.scores[position])
    chosen = {c.item_id for c in order}
    order += [c for c in p.candidates if c.item_id not in chosen]
    order.sort(key=lambda c: c.relaxed)  # stable: the model's order within each part
    return [
        RankedItem(
            item_id=c.item_id,
            title=c.title,
            score=scored.get(c.item_id, float(c.score)),
            reasons=_reasons(stream, p, c),
        )
        for c in order[: p.query.k]
    ]


def _reasons(stream: StreamApp, p: Pending, candidate: Candidate) -> tuple[str, ...]:
    services = stream.services
    catalogue = services.catalogue
    ask = p.plan.ask if p.plan is not None else None
    near = None
    if candidate.row is not None and services.collaborative is not None:
        row = neighbour(candidate.row, p.rows[-10:], services.collaborative.vectors)
        near = catalogue.titles[row] if row is not None else None
    if ask is None:
        return ()
    return reasons(candidate, ask, catalogue.nouns.did, near)


def recommendation(
    stream: StreamApp, p: Pending, model_version: str, timings: dict[str, float]
) -> Recommendation:
    reranked = p.instruction is not None and p.scores is not None
    if not reranked and not p.reasons:
        p.degrade("fewer than two candidates: the plan's order")
    instruction = None
    if p.instruction is not None:
        titles = _titles(stream, p)
        instruction = p.instruction.text(titles.__getitem__)[:MAX_INSTRUCTION_CHARS]
    return Recommendation(
        request_id=p.query.request_id,
        user_id=p.query.user_id,
        items=tuple(ranked(stream, p)),
        model_version=(p.version or model_version) if reranked else NO_MODEL,
        template_id=p.instruction.template_id if p.instruction else NO_TEMPLATE,
        degraded=bool(p.reasons),
        reason="; ".join(p.reasons) if p.reasons else None,
        timings={k: round(max(0.0, v), 3) for k, v in timings.items()},
        instruction=instruction,
        relaxed=p.plan.relaxed if p.plan is not None else (),
        requested_version=model_version if model_version != "unknown" else None,
    )


def publish(stream: StreamApp, p: Pending, answer: Recommendation, impression: Impression | None) -> None:
    """Record the request as answered and queue the answer — one synchronous step (see streams.state.served)."""
    settings = stream.settings.stream
    with processing(p.event):
        served = Served.from_bytes(stream.tables.served.get(p.query.user_id))
        served.record(
            p.query.request_id,
            impression,
            answered=settings.answered_requests,
            impressions=settings.impressions,
        )
        stream.tables.served[p.query.user_id] = served.to_bytes()
        stream.send(stream.topics.recommendations, p.query.user_id, encode(answer), "recommendations")
    if answer.degraded:
        stream.metrics.degraded.labels(_cause(answer.reason or "")).inc()


def _cause(reason: str) -> str:
    for cause in ("reranker", "qdrant", "cold start", "no vectors", "embedding", "error"):
        if cause in reason:
            return cause.replace(" ", "_")
    return "other"


def _impression(p: Pending, answer: Recommendation) -> Impression:
    """What was served, for feedback and for scoring the answer against the user's next interaction."""
    candidates = tuple(p.items.ids[c] for c in p.instruction.candidates) if p.instruction else ()
    return Impression(
        request_id=p.query.request_id,
        instruction=answer.instruction or "",
        candidates=candidates or tuple(i.item_id for i in answer.items),
        served=tuple(i.item_id for i in answer.items),
        template_id=answer.template_id,
        model_version=answer.model_version,
        ts=p.query.ts,
        intention=p.query.text,
    )


# ------------------------------------------------------------------------------------------------ the agent


async def answer_batch(stream: StreamApp, events: Sequence, limiter: UserRateLimiter | None = None) -> int:
    """Answer a micro-batch of query events (each user's held to `limiter`, if any); returns how many
    answers were published."""
    started, wall = time.perf_counter(), time.time()
    metrics = stream.metrics
    metrics.events_in.labels("queries").inc(len(events))
    batch = intake(stream, events, wall, limiter)
    try:
        return await _answer(stream, batch, started) if batch else 0
    finally:
        stream.in_flight.difference_update(p.query.request_id for p in batch)


async def _answer(stream: StreamApp, batch: list[Pending], started: float) -> int:
    metrics = stream.metrics
    metrics.batch_size.observe(len(batch))
    marks = {"context_ms": time.perf_counter()}
    try:
        await embed(stream, batch)
        marks["embed_ms"] = time.perf_counter()
        await retrieve(stream, batch)
        marks["retrieve_ms"] = time.perf_counter()
        await render(stream, batch)
        marks["render_ms"] = time.perf_counter()
    except Exception as error:  # a bug: every query still hears back
        log.exception("query batch failed")
        for p in batch:
            stream.dead_letters.send_event(p.event, error)
            p.instruction, p.request, p.candidates = None, None, []
            p.degrade(f"error: {type(error).__name__}")
    stages, previous = {}, started
    for name, at in marks.items():
        stages[name] = (at - previous) * 1000
        previous = at
    for name, value in stages.items():
        metrics.stage_seconds.labels(name.removesuffix("_ms")).observe(value / 1000)
    # Each query is answered the moment its own scores are back: one does not wait for its batch's slowest
    # (with more requests than Triton instances, the last ones wait for an instance).
    await asyncio.gather(*(_rerank_and_publish(stream, p, stages, started) for p in batch))
    return len(batch)


async def _rerank_and_publish(
    stream: StreamApp, p: Pending, stages: dict[str, float], started: float
) -> None:
    rerank_ms = await rerank(stream, p)
    total = (time.perf_counter() - started) * 1000
    timings = {"queue_ms": p.queue_ms, **stages, "rerank_ms": rerank_ms, "total_ms": total}
    try:
        answer = recommendation(stream, p, _model_version(stream), timings)
        impression = _impression(p, answer)
    except Exception as error:  # one query's problem stays that query's
        stream.dead_letters.send_event(p.event, error)
        answer = Recommendation(
            request_id=p.query.request_id,
            user_id=p.query.user_id,
            items=(),
            model_version=NO_MODEL,
            template_id=NO_TEMPLATE,
            degraded=True,
            reason=f"error: {type(error).__name__}",
        )
        impression = None
    publish(stream, p, answer, impression)
    stream.metrics.stage_seconds.labels("rerank").observe(rerank_ms / 1000)
    stream.metrics.stage_seconds.labels("total").observe(total / 1000)


def _model_version(stream: StreamApp) -> str:
    try:
        return str(stream.services.reranker.model_version) or "unknown"
    except Exception:  # the version is informative; never let it fail an answer
        return "unknown"


def install(stream: StreamApp) -> None:
    """One actor takes micro-batches off the topic and answers them, up to `query_concurrency` at once
    (`answer_in_flight`)."""
    settings = stream.settings.stream
    size, window = settings.batch_size, settings.batch_window_s
    # One limiter for the worker. Queries are keyed by user id, so all of a user's queries come to the
    # worker that owns the user's partition: this worker's limiter is exact per user, not per worker.
    limiter = UserRateLimiter.from_settings(settings)

    async def queries(events_stream):
        batches = events_stream.take_events(size, within=window)
        await answer_in_flight(stream, batches, limiter, settings.query_concurrency)

    stream.app.agent(stream.topics.queries, name="queries")(queries)


async def answer_in_flight(
    stream: StreamApp, batches: AsyncIterator[Sequence], limiter: UserRateLimiter | None, concurrency: int
) -> None:
    """Each batch answered by a task of its own, up to `concurrency` at once: while one waits on Triton, the
    next is retrieved and rendered.

    Not Faust's agent concurrency: each of its actors' streams pulls its next event while the actor's batch
    is still being answered and holds it until that batch is done (`take_events` buffers nothing while its
    batch is out), so a query could wait behind a batch not its own while another actor was idle. Here a
    batch is taken when a slot is free, any slot, and holds every query that arrived meanwhile.

    A batch's events stay unacknowledged until their answers are published (`Message.incref` now, `ack`
    when done), so offsets are still committed only up to the oldest unanswered query and a crash
    redelivers rather than loses; Faust also waits for them before a rebalance (`stream_wait_empty`)."""
    slots = asyncio.Semaphore(concurrency)
    running: set[asyncio.Task] = set()  # referenced until done: the loop keeps only weak references
    await slots.acquire()
    try:
        async for events in batches:
            held = list(events)
            for event in held:
                event.message.incref()  # take_events acknowledges as this loop goes on; the answer ends it
            task = asyncio.create_task(_answer_then_ack(stream, held, limiter, slots))
            running.add(task)
            task.add_done_callback(running.discard)
            # The next batch is taken once a slot is free: it then holds all that arrived meanwhile.
            await slots.acquire()
    finally:  # stopping: the batches in flight are answered first (a second cancel leaves them unacked)
        await asyncio.gather(*running, return_exceptions=True)


async def _answer_then_ack(
    stream: StreamApp, events: list, limiter: UserRateLimiter | None, slot: asyncio.Semaphore
) -> None:
    try:
        await answer_batch(stream, events, limiter)
    except Exception:  # answer_batch answers every query it can; what escapes it is a bug, not a stop
        log.exception("query batch failed")
    finally:
        slot.release()
    for event in events:  # not reached when cancelled: unacknowledged, the queries are redelivered
        event.ack()
