"""What a demo trains, replays and fine-tunes. `FULL` fits `make demo` in 15 minutes on 2 cores from a fresh
clone, `QUICK` fits `make demo-quick` in 5 (a smaller model, fewer users); the demo's closing line reports
its wall time."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

REQUESTS = (
    "something funny for tonight",
    "a 90s sci-fi thriller, not a horror",
    "a romantic comedy from the 2000s",
    "an animated movie for the kids",
)


@dataclass(frozen=True)
class DemoPreset:
    name: str
    # -- the model (part of the cache key)
    users: int | None  # the first N users of ml-latest-small; None: all 610
    share: float  # trained on interactions up to this quantile of time; the rest is replayed live
    encoder_layers: int
    decoder_layers: int
    sasrec_epochs: int
    reranker_minutes: float
    # -- the live part
    rate: float  # events per second of the live replay
    live_seconds: float  # how long the live replay lasts at most
    query_every: int  # a query before every n-th interaction of a user
    text_rate: float  # share of queries with a request text
    # -- the fine-tune worker
    every_examples: int
    holdout: int
    budget_minutes: float
    requests: tuple[str, ...] = REQUESTS  # sent to POST /recommend at the end

    def model_key(self) -> str:
        """Names the cached pipeline: any field that changes what is trained changes it."""
        trained = {
            k: v
            for k, v in asdict(self).items()
            if k
            in ("users", "share", "encoder_layers", "decoder_layers", "sasrec_epochs", "reranker_minutes")
        }
        digest = hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.name}-{digest}"


FULL = DemoPreset(
    name="full",
    users=None,
    share=0.7,
    encoder_layers=4,
    decoder_layers=2,
    sasrec_epochs=20,
    reranker_minutes=2.5,
    rate=40.0,
    live_seconds=150.0,
    query_every=5,
    text_rate=0.5,
    every_examples=500,
    holdout=500,
    budget_minutes=1.5,
)

QUICK = DemoPreset(
    name="quick",
    users=200,
    share=0.7,
    encoder_layers=2,
    decoder_layers=1,
    sasrec_epochs=8,
    reranker_minutes=0.75,
    rate=30.0,
    live_seconds=60.0,
    query_every=4,
    text_rate=0.5,
    every_examples=200,
    holdout=200,
    budget_minutes=0.5,
)
