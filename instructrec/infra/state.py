"""The state file: what `up` started (pids, ports, logs), and the settings that point at it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from instructrec.config import Settings
from instructrec.infra.errors import InfraError
from instructrec.infra.ports import LOOPBACK
from instructrec.infra.processes import ManagedProcess

STATE_FILE = "infra.json"
COMPONENTS: tuple[str, ...] = ("kafka", "triton", "qdrant")
Component = Literal["kafka", "triton", "qdrant"]


class KafkaState(ManagedProcess):
    port: int
    data_dir: Path

    @property
    def bootstrap_servers(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def broker(self) -> str:
        return f"kafka://{self.bootstrap_servers}"


class TritonState(ManagedProcess):
    http_port: int
    grpc_port: int
    metrics_port: int
    models: list[str]
    model_repository: Path
    backend_dir: Path
    # What Triton's leftover locations held before it started, so that `down` only removes what is new.
    shm_before: list[str] = Field(default_factory=list)
    tmp_before: list[str] = Field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"


class QdrantState(BaseModel):
    path: Path


class State(BaseModel):
    """What `up` started. A component is absent when it is not managed here."""

    kafka: KafkaState | None = None
    triton: TritonState | None = None
    qdrant: QdrantState | None = None

    def is_empty(self) -> bool:
        return self.kafka is None and self.triton is None and self.qdrant is None

    def settings(self, base: Settings) -> Settings:
        """`base` pointed at the managed services (unmanaged parts stay as configured)."""
        update: dict[str, Any] = {}
        if self.kafka:
            # The local broker speaks plaintext, whatever security the configured cluster needs.
            update["kafka"] = base.kafka.model_copy(
                update={"broker": self.kafka.broker, "security_protocol": "PLAINTEXT", "sasl_mechanism": None}
            )
        if self.triton:
            url = self.triton.grpc_url if base.triton.protocol == "grpc" else self.triton.http_url
            update["triton"] = base.triton.model_copy(  # the local tritonserver speaks plaintext too
                update={"url": url, "repository": self.triton.model_repository, "tls": False}
            )
        if self.qdrant:
            update["qdrant"] = base.qdrant.model_copy(update={"url": None, "path": self.qdrant.path})
        return base.model_copy(update=update)

    def env(self, base: Settings) -> dict[str, str]:
        """``INSTRUCTREC_*`` variables that point another process at the managed services."""
        fields = [
            name
            for name, managed in (
                ("kafka.broker", self.kafka),
                ("triton.url", self.triton),
                ("qdrant.path", self.qdrant),
            )
            if managed
        ]
        return self.settings(base).to_env(*fields) if fields else {}

    def save(self, path: Path) -> None:
        # Write-then-rename so that a crash never leaves a truncated state file behind.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> State:
        if not path.exists():
            return cls()
        try:
            return cls.model_validate_json(path.read_text())
        except (ValidationError, ValueError) as error:
            raise InfraError(
                f"the infra state file {path} is unreadable ({error.__class__.__name__}). Stop what it "
                f"recorded by hand if anything still runs, then delete the file."
            ) from error
