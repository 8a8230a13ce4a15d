"""The local Kafka-compatible broker: the noida-db binary, run in the foreground on loopback."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from instructrec.infra.errors import BinaryNotFoundError
from instructrec.infra.ports import LOOPBACK


def find_noida_db(configured: Path | None = None) -> Path:
    """The noida-db binary itself, not the `noida-db` console script.

    The console script is a Python wrapper that runs the binary as a child: a SIGTERM to the wrapper would
    orphan the broker. So we prefer the binary inside the wheel and run it directly.
    """
    if configured is not None:
        if configured.is_file() and os.access(configured, os.X_OK):
            return configured
        raise BinaryNotFoundError(f"noida-db not found at {configured} (INSTRUCTREC_INFRA__NOIDA_DB)")
    spec = importlib.util.find_spec("noida_db")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "noida-db"
        if binary.is_file():
            if not os.access(binary, os.X_OK):
                binary.chmod(
                    0o755
                )  # installers may drop the execute bit; noida-db's own wrapper does this too
            return binary
    on_path = shutil.which("noida-db")
    if on_path:
        return Path(on_path)
    raise BinaryNotFoundError(
        "noida-db not found: install the project's dependencies (`make venv`, or `pip install noida-db==0.2.3`) "
        "or set INSTRUCTREC_INFRA__NOIDA_DB to the binary"
    )


def noida_command(binary: Path, port: int, data_dir: Path) -> list[str]:
    return [
        str(binary),
        "start",
        "--only",
        "kafka",
        "--kafka-port",
        str(port),
        "--host",
        LOOPBACK,
        "--data-dir",
        str(data_dir),
    ]
