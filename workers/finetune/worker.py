"""The fine-tune worker: learns from the stream while it serves, gates what it learned, and hot-swaps it in.

    instructrec finetune              # runs until SIGTERM / Ctrl-C
    instructrec finetune rollback     # the previous model version serves again
    instructrec finetune status       # the store, the last cycle, the versions

The loop (one asyncio task, training on a thread of its own):
- consume `clicks` and `feedback` (its own consumer group, every partition: one fine-tune worker per
  deployment), turn each poll into examples (`ingest`) and commit examples *and* positions to the store in one
  fsynced transaction, then commit the Kafka offsets: a restart resumes from the store's positions and
  neither loses nor repeats an example;
- a cycle starts every `every_examples` new examples, or `every_minutes` after the last one with at least
  `min_examples`: it trains a candidate on the new examples and a replay sample — from the served version,
  or from the challenger (the last rejected candidate, not clearly worse, of the same served version) —
  judges it against the served version on the newest examples it never saw (`gate`), and publishes an
  accepted one (`publish`); every verdict goes to `model-updates`;
- consumption goes on while a cycle trains. Training takes `threads` torch threads at `nice` priority, so
  the cores Triton and the stream need stay theirs (`benchmarks/loop.py` measures serving during a cycle).

A SIGKILL mid-training loses the cycle and nothing else (the store is intact; the next start trains again
from the same point, and from the same challenger: the store's last finished cycle names it, and a folder
under `candidates/` that no finished cycle names is swept at start); mid-publish, the repository holds either no new folder or a whole one, and the next
start finishes or undoes the swap (`publish.reconcile`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from instructrec.adapters.triton.client import TritonReranker
from instructrec.adapters.triton.repository import default_repository, staging_dir, versions
from instructrec.artifacts import VERSION_WEIGHTS_DIR, Artifacts
from instructrec.config import Settings
from instructrec.events import ModelUpdate
from instructrec.model.reranker import Reranker
from instructrec.planner import OfflinePlanner
from instructrec.serving.heap import release_heap
from instructrec.serving.options import ServingOptions
from streams.kafka.compat import close_fetcher_quietly, pause_after_empty_fetch
from streams.kafka.producer import EventProducer
from streams.runner import SHUTDOWN_TIMEOUT_S, ShutdownDeadline
from workers.finetune import cycle as cycles
from workers.finetune.ingest import ingest
from workers.finetune.publish import Published, publish, reconcile
from workers.finetune.store import ExampleStore

log = logging.getLogger(__name__)


TRITON_RETRY_S = 10.0


def store_path(settings: Settings) -> Path:
    return settings.finetune.store or Path(settings.state_dir) / "finetune" / "examples.db"


def repository_of(settings: Settings) -> Path:
    return Path(settings.triton.repository or default_repository())


@dataclass
class Outcome:
    """What a cycle came to, for the verdict event and the status command."""

    cycle: int
    accepted: bool
    reason: str
    metrics: dict[str, float]
    incumbent: str
    version: str  # the published version, or the candidate's name when rejected
    examples: int
    seconds: float
    examples_per_s: float
    # The store's newest example id when this version went live: the examples after it were served by it
    # (until the next swap), and neither it nor its incumbent trained on them. benchmarks/loop.py judges there.
    live_after: int | None = None
    carried: int = 1  # cycles whose examples this candidate trained on (> 1: it carried on a challenger)
    challenger: str | None = None  # the folder under `candidates/` the next cycle carries on, if any


class FinetuneWorker:
    def __init__(self, settings: Settings, *, corrupt_next: bool = False) -> None:
        self.settings = settings
        self.config = settings.finetune
        self.store = ExampleStore(
            store_path(settings),
            max_examples=self.config.max_examples,
            replay_size=self.config.replay_size,
        )
        self.repository = repository_of(settings)
        self.work = store_path(settings).parent / "candidates"
        self.stop = asyncio.Event()
        self.corrupt_next = corrupt_next  # the next cycle trains on shuffled answers (tests of the gate)
        self.outcomes: list[Outcome] = []
        self._cycle: asyncio.Future | None = None
        self._last_cycle_at = time.monotonic()
        self._triton_retry_at = 0.0  # Triton unreachable: when to ask again before starting a cycle
        self._unannounced: list[Outcome] = []  # verdicts the broker did not take yet (they are stored)
        artifacts = Artifacts.of(settings.model.artifacts, settings.stream.dataset)
        from instructrec.experiment import PipelineConfig

        self.pipeline = PipelineConfig.load(artifacts.pipeline)
        self.planner = OfflinePlanner.load(
            artifacts, retriever=self.pipeline.retriever, config=self.pipeline.plan
        )

    # -- the loop

    async def run(self, on_outcome: Callable[[Outcome], None] | None = None) -> None:
        kafka = self.settings.kafka
        pause_after_empty_fetch(kafka.empty_fetch_pause_s)
        close_fetcher_quietly()
        self._sweep_candidates()
        async with TritonReranker(self.settings.triton) as triton, EventProducer(kafka) as producer:
            await self._reconcile(triton, producer)
            consumer = await self._consumer()
            try:
                while not self.stop.is_set():
                    await self._poll(consumer)
                    outcome = await self._maybe_cycle(triton, producer)
                    await self._announce_pending(producer)
                    if outcome is not None and on_outcome is not None:
                        on_outcome(outcome)
            finally:
                await consumer.stop()
                self.store.close()

    async def _consumer(self) -> AIOKafkaConsumer:
        kafka = self.settings.kafka
        consumer = AIOKafkaConsumer(
            **kafka.aiokafka_kwargs(),
            group_id=self.config.group_id,
            enable_auto_commit=False,
            fetch_max_wait_ms=500,
        )
        await consumer.start()
        wanted = [kafka.topics.clicks, kafka.topics.feedback]
        partitions = [
            TopicPartition(t, p) for t in wanted for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        consumer.assign(partitions)
        stored = self.store.positions()
        for tp in partitions:
            if (tp.topic, tp.partition) in stored:
                consumer.seek(tp, stored[(tp.topic, tp.partition)])
            else:
                await consumer.seek_to_beginning(tp)
        return consumer

    async def _poll(self, consumer: AIOKafkaConsumer) -> None:
        found = await consumer.getmany(timeout_ms=int(self.config.poll_s * 1000), max_records=5000)
        records = [r for batch in found.values() for r in batch]
        if not records:
            return
        kafka = self.settings.kafka
        batch, invalid = ingest(
            records,
            clicks_topic=kafka.topics.clicks,
            feedback_topic=kafka.topics.feedback,
            history_of=self.store.history,
            history_size=self.store.history_size,
            since_ts=self.config.since_ts,
        )
        await asyncio.to_thread(self.store.commit, batch)  # examples and positions, fsynced, first
        offsets = {TopicPartition(t, p): OffsetAndMetadata(o, "") for (t, p), o in batch.positions.items()}
        try:
            await consumer.commit(offsets)  # then the group's offsets: lag reporting, not correctness
        except Exception as error:
            log.warning("offset commit failed (%s); the store's positions are what a restart uses", error)
        if invalid:
            log.info("%d record(s) were not valid events: skipped (the stream dead-letters them)", invalid)

    # -- cycles

    def training(self) -> bool:
        return self._cycle is not None and not self._cycle.done()

    def due(self) -> bool:
        since = (self.store.last_cycle() or {}).get("trained_to", 0)
        new = self.store.count(since=since)
        if new >= self.config.every_examples + self.config.holdout:
            return True
        waited = (time.monotonic() - self._last_cycle_at) / 60
        return waited >= self.config.every_minutes and new >= self.config.min_examples + self.config.holdout

    async def _maybe_cycle(self, triton: TritonReranker, producer: EventProducer) -> Outcome | None:
        if self._cycle is None:
            if time.monotonic() >= self._triton_retry_at and self.due():
                try:
                    incumbent = await triton.refresh_model_version()
                except Exception as error:  # Triton down or restarting: a cycle needs to know what it serves
                    log.warning("Triton did not say what it serves (%s): the cycle waits", error)
                    self._triton_retry_at = time.monotonic() + TRITON_RETRY_S
                    return None
                self._cycle = _in_daemon_thread(self._train_cycle, incumbent)
            return None
        if not self._cycle.done():
            return None
        job, self._cycle = self._cycle, None
        self._last_cycle_at = time.monotonic()
        release_heap()  # the cycle's models are garbage now: their memory goes back to the system
        try:
            outcome, candidate_dir = job.result()
        except Exception:  # a failed cycle publishes nothing; the next one starts from the same examples
            log.exception("the fine-tune cycle failed")
            return None
        if outcome.accepted:
            outcome.challenger = None  # it serves now: the next cycle starts from it
            try:
                published = await self._publish(candidate_dir, triton, outcome)
                outcome.version = str(published.version)
                outcome.live_after = self.store.last_id()
            except Exception as error:  # PublishError, or Triton unreachable: the old version serves on
                outcome.accepted, outcome.reason = False, f"not published: {error}"
        # The record first, then the folders it no longer names: a kill in between leaves a stray, swept at start.
        self.store.end_cycle(outcome.cycle, time.time(), asdict(outcome))
        self._sweep_candidates()
        self._unannounced.append(outcome)
        self.outcomes.append(outcome)
        return outcome

    async def _announce_pending(self, producer: EventProducer) -> None:
        """Publish stored verdicts to `model-updates`; with the broker away they wait for the next round."""
        while self._unannounced:
            try:
                await self._announce(producer, self._unannounced[0])
            except Exception as error:
                log.warning(
                    "could not publish the verdict of cycle %d yet (%s)", self._unannounced[0].cycle, error
                )
                return
            self._unannounced.pop(0)

    def _train_cycle(self, incumbent: str) -> tuple[Outcome, Path]:
        """On the training thread: split, prepare, train, gate. Nothing is published from here."""
        started = time.perf_counter()
        since = (self.store.last_cycle() or {}).get("trained_to", 0)
        seed = self.store.counter("ingested")
        split = cycles.split_examples(self.store, since, self.config, seed)
        cycle_id = self.store.begin_cycle(time.time(), split.trained_to)
        corrupt, self.corrupt_next = self.corrupt_next, False
        prepared = cycles.prepare(
            split.train,
            self.planner,
            self.pipeline.k,
            feedback_weight=self.config.feedback_weight,
            seed=seed,
            corrupt=corrupt,
        )
        weights = self._served_weights(incumbent)
        device = cycles.training_device(self.config.device)
        challenger, carried = cycles.challenger(self.store.last_cycle(), incumbent, self.work)
        candidate = Reranker.from_pretrained(challenger or weights).to(device)
        budget = self.config.budget_minutes * 60 - (time.perf_counter() - started)
        trained = cycles.train_candidate(candidate, prepared, self.planner.catalogue, self.config, budget)
        # Both judged as Triton serves them: in the served version's calibrated precision, if it has one.
        served = ServingOptions(calibrated=True, device=device).for_version(weights.parent)
        judged = cycles.gate(
            cycles.as_served(candidate, served),
            cycles.as_served(Reranker.from_pretrained(weights).to(device), served),
            cycles.judged_examples(self.store, split, self.config),
            self.planner,
            self.pipeline.weight_for,
            self.config,
        )
        out = cycles.save_candidate(candidate.cpu(), self.work / f"cycle-{cycle_id}")
        verdict = judged.verdict
        carried += 1
        metrics = {
            **verdict.metrics,
            "examples": float(len(prepared.instances)),
            "new_examples": float(split.new),
            "skipped": float(prepared.skipped),
            "examples_per_s": trained.examples_per_s,
            "train_s": trained.seconds,
            "loss_first": trained.loss_first,
            "loss_last": trained.loss_last,
            "corrupted": float(corrupt),
            "lora": float(trained.method == "lora"),  # else a full fine-tune (`FinetuneSettings.method`)
            "carried": float(carried),
        }
        outcome = Outcome(
            cycle_id,
            verdict.accepted,
            verdict.reason,
            {k: float(v) for k, v in metrics.items() if v == v},  # NaN-free for the event
            incumbent,
            f"candidate-{cycle_id}",
            trained.examples,
            time.perf_counter() - started,
            trained.examples_per_s,
            carried=carried,
            challenger=out.name if cycles.carries_on(verdict, carried, self.config) else None,
        )
        return outcome, out

    def _sweep_candidates(self) -> None:
        cycles.sweep(self.work, self.store.last_cycle())

    def _served_weights(self, incumbent: str) -> Path:
        found = versions(self.repository)
        version = (
            int(incumbent)
            if incumbent.isdigit() and int(incumbent) in found
            else (found[-1] if found else None)
        )
        if version is None:
            raise RuntimeError(
                f"no model version in {self.repository}: export one first (`instructrec export`)"
            )
        return self.repository / "instructrec_reranker" / str(version) / VERSION_WEIGHTS_DIR

    async def _publish(self, candidate_dir: Path, triton: TritonReranker, outcome: Outcome) -> Published:
        # Recorded before the swap starts: a restart cut short mid-publish finishes it (reconcile).
        self.store.end_cycle(outcome.cycle, time.time(), {**asdict(outcome), "publishing": True})
        published = await publish(candidate_dir, self.repository, triton, self.config.keep_versions)
        self.store.record_published(outcome.cycle, published.version)
        return published

    async def _reconcile(self, triton: TritonReranker, producer: EventProducer) -> None:
        shutil.rmtree(staging_dir(self.repository), ignore_errors=True)  # what a killed export left behind
        last = self.store.last_cycle() or {}
        verdict = last.get("verdict") or {}
        accepted = verdict.get("published_version") if verdict.get("accepted") else None
        if verdict.get("publishing") and accepted is None:
            accepted = max(
                versions(self.repository), default=None
            )  # the export happened, the load may not have
        try:
            serving = await reconcile(self.repository, triton, accepted)
        except Exception as error:  # Triton not up yet: the next publish reconciles the same way
            log.warning("could not reconcile the model repository with Triton (%s)", error)
            return
        log.info("serving version %s", serving)

    async def _announce(self, producer: EventProducer, outcome: Outcome) -> None:
        update = ModelUpdate(
            version=outcome.version,
            metrics=outcome.metrics,
            accepted=outcome.accepted,
            reason=outcome.reason[:2000],
            kind="verdict",
            incumbent=outcome.incumbent or None,
        )
        await producer.send(update, wait=True)
        log.info(
            "cycle %d: %s (%s)", outcome.cycle, "accepted" if outcome.accepted else "rejected", outcome.reason
        )


def _in_daemon_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future:
    """Run `fn` on a daemon thread: a worker stopping mid-training exits at once instead of waiting for it."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as error:  # reported to the loop, which decides
            loop.call_soon_threadsafe(_settle, future, None, error)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    threading.Thread(target=target, name="finetune-cycle", daemon=True).start()
    return future


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def run_finetune(settings: Settings, *, shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S) -> int:
    """Process entry: runs until SIGTERM or Ctrl-C, then stops within `shutdown_timeout_s` (or is cut short
    with exit code 75: a stop that waits on a broker or Triton that is gone must not hang)."""
    import signal

    logging.basicConfig(  # the stream worker's line format (Faust's), so the two logs read alike
        level=logging.INFO, format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"
    )
    # Process-wide, and so set here: training takes few threads at a lower priority, so serving keeps the cores.
    torch.set_num_threads(settings.finetune.threads)
    os.nice(settings.finetune.nice)
    worker = FinetuneWorker(settings)
    deadline = ShutdownDeadline(shutdown_timeout_s, "the fine-tune worker's stop")

    def stop(sig: signal.Signals) -> None:
        log.info("%s: stopping (within %g s)", sig.name, shutdown_timeout_s)
        deadline.arm()
        worker.stop.set()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop, sig)
        await worker.run()

    asyncio.run(main())
    if worker.training():
        # A cycle is still training on its daemon thread (its examples stay stored; the next start trains
        # them). Interpreter finalisation with torch busy on another thread aborts the process (SIGABRT,
        # seen by benchmarks/soak.py), so everything else being closed, leave without it.
        log.info("stopped mid-cycle: the cycle's training is abandoned")
        logging.shutdown()
        os._exit(0)
    return 0
