"""The one configuration object.

Every setting comes from an ``INSTRUCTREC_*`` environment variable (nested with ``__``, e.g.
``INSTRUCTREC_KAFKA__BROKER``), an optional env file named by ``INSTRUCTREC_CONFIG_FILE``, or the defaults
below, which suit a single machine on loopback. Build it once at the edge (CLI, worker start-up) and pass it
down; nothing reads the environment behind the caller's back.
"""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class TopicNames(BaseModel):
    items: str = "items"
    clicks: str = "clicks"
    queries: str = "queries"
    recommendations: str = "recommendations"
    feedback: str = "feedback"
    model_updates: str = "model-updates"
    dead_letter: str = "dead-letter"

    def all(self) -> list[str]:
        return list(self.model_dump().values())


def tls_context(
    cafile: Path | None, certfile: Path | None, keyfile: Path | None, *, check_hostname: bool = True
) -> ssl.SSLContext:
    """A client TLS context: the server's chain verified against `cafile` (None: the system's CAs), its name
    checked unless told otherwise, and a client certificate for mutual TLS when `certfile` is given."""
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    context.check_hostname = check_hostname  # verify_mode stays CERT_REQUIRED: the chain is always checked
    if certfile:
        context.load_cert_chain(str(certfile), str(keyfile) if keyfile else None)
    return context


# Secrets (SecretStr) print as "**********" in reprs and dumps; an invalid section's error must not quote
# the input either, since the input holds the secret in clear.
_SECRET_SECTION = ConfigDict(hide_input_in_errors=True)


class KafkaSettings(BaseModel):
    model_config = _SECRET_SECTION

    broker: str = "kafka://127.0.0.1:9092"
    partitions: int = Field(
        4, ge=1, description="partition count of every topic (user-keyed topics co-partition)"
    )
    replication_factor: int = Field(1, ge=1)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="with SASL_*; None: PLAIN"
    )
    # The user name is an identity, not a secret: it stays readable in reprs and logs, which helps to tell
    # which principal a worker authenticated as.
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = Field(
        None, description="the CA of the brokers' certificates; None: the system's"
    )
    ssl_certfile: Path | None = Field(None, description="client certificate for mutual TLS")
    ssl_keyfile: Path | None = Field(None, description="its key (None: in ssl_certfile)")
    ssl_check_hostname: bool = Field(
        True,
        description="check that a broker's certificate names the address dialled (the chain is verified "
        "regardless); off only for certificates that do not name the advertised listeners",
    )
    topics: TopicNames = TopicNames()
    request_timeout_s: float = Field(30.0, gt=0)
    empty_fetch_pause_s: float = Field(
        0.005,
        ge=0,
        description="pause after an empty fetch answered before its max wait (noida-db; streams.compat); 0: off",
    )

    @model_validator(mode="after")
    def _client_pair(self) -> KafkaSettings:
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("ssl_keyfile without ssl_certfile: a client key needs its certificate")
        return self

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL")

    @property
    def tls(self) -> bool:
        return self.security_protocol.endswith("SSL")

    @property
    def bootstrap_servers(self) -> str:
        """The broker list without URL schemes, as aiokafka wants it."""
        return ",".join(part.split("://", 1)[-1] for part in self.broker.split(","))

    def aiokafka_kwargs(self) -> dict:
        """Connection and security keyword arguments for aiokafka producers, consumers and admin clients."""
        kwargs: dict = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": int(self.request_timeout_s * 1000),
        }
        if self.sasl:
            kwargs["sasl_mechanism"] = self.sasl_mechanism or "PLAIN"
            kwargs["sasl_plain_username"], kwargs["sasl_plain_password"] = self.sasl_login()
        if self.tls:
            kwargs["ssl_context"] = self.ssl_context()
        return kwargs

    def sasl_login(self) -> tuple[str, str]:
        """The SASL user name and password, checked when a client needs them rather than when the settings
        are read: the password comes from a Secret of its own, which a ConfigMap-only reading lacks."""
        if self.sasl_username is None or self.sasl_password is None:
            raise ValueError(
                f"kafka: security_protocol {self.security_protocol} needs sasl_username and sasl_password "
                "(INSTRUCTREC_KAFKA__SASL_USERNAME, INSTRUCTREC_KAFKA__SASL_PASSWORD)"
            )
        return self.sasl_username, self.sasl_password.get_secret_value()

    def ssl_context(self) -> ssl.SSLContext:
        return tls_context(
            self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile, check_hostname=self.ssl_check_hostname
        )


class QdrantSettings(BaseModel):
    model_config = _SECRET_SECTION

    url: str | None = Field(
        None, description="a Qdrant server (https://… for TLS); when unset, embedded local mode at `path`"
    )
    path: Path = Path(".state/qdrant")
    api_key: SecretStr | None = Field(None, description="sent with every request: use an https url")
    collection: str = "items"
    timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(3, ge=0, description="retries of a failed call, with exponential backoff")
    backoff_s: float = Field(0.05, gt=0, description="first retry delay; doubles with each retry")
    upsert_batch: int = Field(256, ge=1, description="points per upsert request")
    cf_dim: int = Field(64, ge=1, description="size of the collaborative ('cf') vectors: the retriever's d")
    max_fetch: int = Field(1000, ge=1, description="most points one search over-fetches before filtering")


class TritonSettings(BaseModel):
    url: str = "127.0.0.1:8001"
    protocol: Literal["grpc", "http"] = "grpc"
    reranker_model: str = "instructrec_reranker"
    reranker_version: str = Field("", description="empty: whatever version the server serves")
    timeout_s: float = Field(2.0, gt=0)
    retries: int = Field(2, ge=0)
    repository: Path | None = Field(
        None, description="the model repository the fine-tune worker exports into; None: deploy/triton here"
    )
    tls: bool = Field(False, description="TLS to the server, over either protocol")
    ssl_cafile: Path | None = Field(
        None, description="with tls: the CA of the server's certificate; None: gRPC's bundled or the system's"
    )
    ssl_certfile: Path | None = Field(None, description="with tls: client certificate for mutual TLS ...")
    ssl_keyfile: Path | None = Field(None, description="... and its key (gRPC takes them as two files)")

    @model_validator(mode="after")
    def _client_pair(self) -> TritonSettings:
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("ssl_certfile and ssl_keyfile go together (mutual TLS needs both)")
        return self

    def ssl_context(self) -> ssl.SSLContext:
        return tls_context(self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile)


class ModelSettings(BaseModel):
    """Where model weights live: a Hugging Face checkpoint by path or name, and the local artefact folder."""

    checkpoint: str | None = Field(
        None, description="a seq2seq checkpoint (Flan-T5 in production); None: offline default"
    )
    artifacts: Path = Path("artifacts")
    max_history: int = Field(10, ge=1)
    candidates: int = Field(20, ge=2)


class WebSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(6066, ge=0, le=65535)
    recommend_timeout_s: float = Field(5.0, gt=0)


class StreamSettings(BaseModel):
    """The Faust app: state, micro-batching and the bounds of per-user state."""

    app_id: str = Field("instructrec-stream", description="Faust app id: the consumer group and table prefix")
    store: Literal["rocksdb", "memory"] = Field("rocksdb", description="table store; memory: tests only")
    data_dir: Path | None = Field(
        None, description="RocksDB tables; None: <state_dir>/faust/<app_id>-<web port>"
    )
    # Faust opens one RocksDB per table and partition with 3 × 64 MB memtables and a 2 GB block cache each:
    # the worker's memory then grows with every byte written until hundreds of MB per partition
    # (benchmarks/soak.py). These bound it: tables × partitions × (write buffers + block cache).
    table_write_buffer_mb: int = Field(4, ge=1, description="RocksDB memtable size per table partition")
    table_write_buffers: int = Field(2, ge=2, description="memtables per table partition (one flushing)")
    table_block_cache_mb: int = Field(16, ge=0, description="RocksDB read cache per table partition")
    # Faust keeps every table file open (max_open_files near a million). Compaction keeps a partition at a few
    # files (four level-0 files trigger a merge), but only this cap bounds the descriptors whatever the data.
    table_max_open_files: int = Field(
        32, ge=20, description="RocksDB table files kept open per table partition (RocksDB's minimum is 20)"
    )
    dataset: str = Field(
        "ml-latest-small", description="artifacts/<dataset>/ holds the collaborative retriever"
    )
    batch_size: int = Field(16, ge=1, description="queries per micro-batch (one Triton call)")
    batch_window_s: float = Field(0.005, gt=0, description="longest wait for a micro-batch to fill")
    query_concurrency: int = Field(
        2,
        ge=1,
        description="query micro-batches in flight at once: one's Triton call overlaps the next's retrieval",
    )
    commit_interval_s: float = Field(1.0, gt=0, description="offset commits; shorter: fewer redeliveries")
    # A served-log record holds up to `answered_requests` ids (9 KB at 256) and `impressions` answers, each
    # with its instruction: past aiokafka's 16 KiB default batch, a second write to the same partition waits
    # inside Faust's one sender for the first request's round trip, holding every answer queued behind it.
    producer_batch_kb: int = Field(
        256, ge=16, description="producer batch per partition, KiB (a record larger than it goes alone)"
    )
    history_size: int = Field(200, ge=1, description="recent items kept per user (and excluded from answers)")
    explicit_size: int = Field(50, ge=1, description="ratings, dislikes and tags kept per user, each")
    reviews_size: int = Field(10, ge=1)
    seen_events: int = Field(512, ge=1, description="click event ids remembered per user (idempotency)")
    answered_requests: int = Field(256, ge=1, description="request ids remembered per user (deduplication)")
    impressions: int = Field(5, ge=0, description="recent answers kept per user to join clicks into feedback")
    recovery_stall_s: float = Field(
        30.0, gt=0, description="restart a table recovery that has received no changelog event for this long"
    )
    canonical_url: str | None = Field(
        None, description="how other workers reach this one's web server; None: http://<web.host>:<web port>"
    )
    # Static membership (Kafka's group.instance.id, KIP-345): a worker restarted with its instance id takes its
    # place and partitions back without a rebalance (Kafka: within the session timeout; noida-db: what lets a
    # worker restarted after a SIGKILL get its partitions at all, tests/integration/test_crash.py). A static
    # member that stops sends no LeaveGroup, so its partitions wait for its return (Kafka: up to the session
    # timeout; noida-db: for ever): give one only to workers that come back, such as a StatefulSet's pods.
    instance_id: str | None = Field(
        None,
        min_length=1,
        description="Kafka's group.instance.id: unique per worker and the same across its restarts (a "
        "StatefulSet pod's name); None: dynamic membership",
    )
    rejoin_on_stale_commit: bool = Field(
        True,
        description="read a commit's ILLEGAL_GENERATION as REBALANCE_IN_PROGRESS (noida-db; see streams.compat)",
    )
    user_rate_per_s: float = Field(
        0.0,
        ge=0,
        description="queries per second a user may send, sustained (streams.ratelimit); 0: no limit",
    )
    user_burst: int = Field(10, ge=1, description="queries a user may send at once, above the sustained rate")


class FinetuneSettings(BaseModel):
    """The fine-tune worker (`instructrec finetune`): what it learns from, when, for how long, and the gate."""

    group_id: str = Field("instructrec-finetune", description="its own consumer group on feedback and clicks")
    store: Path | None = Field(
        None, description="the example store (SQLite); None: <state_dir>/finetune/examples.db"
    )
    every_examples: int = Field(2000, ge=1, description="a cycle starts after this many new examples ...")
    every_minutes: float = Field(
        60.0, gt=0, description="... or this long after the last one, with min_examples"
    )
    min_examples: int = Field(200, ge=1, description="fewer new examples than this: no cycle")
    # Only examples whose chosen item the plan retrieves are judged (a fifth to a third of clicks examples,
    # benchmarks/loop.py): a few hundred judged ones take a thousand or more.
    holdout: int = Field(
        1000,
        ge=20,
        description="the newest examples the gate judges on (never trained on), with up to as many "
        "that arrive while the cycle trains",
    )
    replay: float = Field(0.5, ge=0, le=1, description="share of a cycle's batch drawn from older examples")
    # A cycle that started late (examples pile up while the previous one trains) would otherwise prepare
    # thousands of examples its budget can never train: benchmarks/loop.py saw one run past 13 minutes.
    cycle_examples: int = Field(
        1500,
        ge=1,
        description="most examples one cycle prepares: the newest new ones, plus the replay share; older new "
        "ones join the replay pool. What `budget_minutes` trains on a CPU (about 1.4/s); raise it on a GPU",
    )
    feedback_weight: float = Field(
        2.0, ge=0, description="a feedback example counts this many clicks examples"
    )
    budget_minutes: float = Field(8.0, gt=0, description="wall-clock budget of one cycle's training")
    epochs: int = Field(2, ge=1)
    # Every weight at one rate, low: the offline run's two rates (1e-4, and 1e-3 for the parts it starts from
    # scratch) gained most on stored examples judged offline but lost 0.008 and 0.010 NDCG@10 in the loop
    # benchmark's first two cycles, and 3e-4 lost 0.030 (README, "Feedback loop").
    lr: float = Field(5e-5, gt=0, description="learning rate of a full fine-tune")
    # benchmarks/loop.py (`side_studies`) measures both methods on the same examples and budget; on this CPU
    # neither has reliably beaten the served version within a cycle yet (README, "Feedback loop").
    method: Literal["auto", "lora", "full"] = Field(
        "auto",
        description="LoRA (merged before export), every weight, or auto: LoRA above `lora_above` parameters",
    )
    lora_above: int = Field(
        100_000_000, ge=0, description="auto: models with more parameters than this train LoRA adapters"
    )
    lora_r: int = Field(8, ge=1)
    # Adapters start at zero, so they take a larger rate than every weight does, but not 20× (the loop
    # benchmark's LoRA cycles at 1e-3 lost NDCG@10 to the served version).
    lora_lr: float = Field(1e-4, gt=0, description="learning rate of the LoRA adapters")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where it trains; auto: a GPU if present"
    )
    threads: int = Field(1, ge=1, description="torch threads for training: the rest of the cores serve")
    nice: int = Field(10, ge=0, le=19, description="CPU priority of the worker below serving")
    min_margin: float = Field(
        0.002, ge=-1, description="NDCG@10 the candidate must gain on the holdout (< 0: tests)"
    )
    confidence: float = Field(0.9, ge=0, lt=1, description="paired bootstrap: P(gain > 0) needed to accept")
    # A cycle's few hundred examples move the served version by less than the gate can see on a CPU; a
    # rejected candidate that is not clearly worse goes on learning in the next cycle instead of being thrown
    # away, and is judged against the served version again on newer examples.
    carry_cycles: int = Field(
        4,
        ge=1,
        description="most cycles a rejected candidate carries on training (the challenger) before the next "
        "starts again from the served version; 1: every cycle starts from the served version",
    )
    keep_versions: int = Field(3, ge=2, description="model versions kept in the repository")
    max_examples: int = Field(200_000, ge=100, description="the store's bound (older ones evicted ...)")
    replay_size: int = Field(20_000, ge=0, description="... except a reservoir of this many, for replay")
    poll_s: float = Field(1.0, gt=0, description="how often the worker checks whether a cycle is due")
    since_ts: float = Field(
        0.0,
        ge=0,
        description="interactions before this time (event time) build histories, not examples: the served "
        "model was trained on them",
    )


class InfraSettings(BaseModel):
    """What `instructrec infra up` starts on loopback for tests and the demo; production points elsewhere."""

    kafka_port: int = Field(0, ge=0, le=65535, description="0: any free port")
    triton_http_port: int = Field(0, ge=0, le=65535, description="0: any free port")
    triton_grpc_port: int = Field(0, ge=0, le=65535, description="0: any free port")
    triton_metrics_port: int = Field(0, ge=0, le=65535, description="0: any free port")
    model_repository: Path | None = Field(None, description="None: deploy/triton of this checkout")
    models: list[str] = Field(
        default_factory=lambda: ["health"], description="loaded at start (explicit mode)"
    )
    noida_db: Path | None = Field(
        None, description="the noida-db binary; None: the one in the noida-db wheel"
    )
    tritonserver: Path | None = Field(None, description="None: the tritonserver in the nvidia-pytriton wheel")
    start_timeout_s: float = Field(60.0, gt=0)
    stop_timeout_s: float = Field(15.0, gt=0, description="after SIGTERM, before SIGKILL")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INSTRUCTREC_",
        env_nested_delimiter="__",
        env_file=os.environ.get("INSTRUCTREC_CONFIG_FILE"),
        extra="ignore",
        hide_input_in_errors=True,  # a section's errors are reported here: see _SECRET_SECTION
    )

    state_dir: Path = Field(
        Path(".state"), description="pids, ports, logs and data of the local infrastructure"
    )
    data_root: Path = Field(Path("data"), description="where named datasets (ml-latest-small, ml-100k) live")
    kafka: KafkaSettings = KafkaSettings()
    qdrant: QdrantSettings = QdrantSettings()
    triton: TritonSettings = TritonSettings()
    model: ModelSettings = ModelSettings()
    web: WebSettings = WebSettings()
    stream: StreamSettings = StreamSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    infra: InfraSettings = InfraSettings()

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    def to_env(self, *fields: str) -> dict[str, str]:
        """``INSTRUCTREC_*`` variables that rebuild these settings in another process (``Settings()`` there).

        Without `fields`: every section as one JSON document (secrets included: a child's environment is
        readable by its own user only). With dotted `fields` ("kafka.broker"): just those, as plain values,
        e.g. for ``export`` lines a person pastes into another shell.
        """
        if not fields:
            return {
                f"{ENV_PREFIX}{name.upper()}": _env_value(_plain(getattr(self, name)))
                for name in type(self).model_fields
            }
        env = {}
        for dotted in fields:
            value: Any = self
            for part in dotted.split("."):
                value = getattr(value, part)
            env[ENV_PREFIX + dotted.upper().replace(".", "__")] = _env_value(_plain(value))
        return env


ENV_PREFIX = "INSTRUCTREC_"


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _env_value(value: Any) -> str:
    """Sections and collections travel as JSON (pydantic-settings decodes them); scalars as plain text."""
    return json.dumps(value) if isinstance(value, dict | list) else "" if value is None else str(value)


def reference(model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX) -> list[tuple[str, str, str]]:
    """Every setting as (environment variable, default, description), nested sections flattened with `__`:
    what `instructrec config` prints and the README's configuration table is checked against."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        variable = prefix + name.upper()
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            rows += reference(kind, variable + "__")
            continue
        default = field.get_default(call_default_factory=True)
        shown = "(secret)" if isinstance(default, SecretStr) else json.dumps(_plain(default), default=str)
        rows.append((variable, shown, field.description or ""))
    return rows
