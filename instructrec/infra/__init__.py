"""Local development infrastructure for tests, benchmarks and the demo: a Kafka-compatible broker, Triton and
embedded Qdrant storage on loopback, and stream workers as child processes. Production never imports this
package (tests/unit/test_architecture.py holds it to that).

``Infrastructure(settings).up()`` starts what is missing and records pids, ports and log files in
``<state_dir>/infra.json``; ``.down()`` stops exactly those processes; ``.status()`` asks each service for
real whether it is healthy. The CLI (``instructrec infra up|down|status``) and the pytest session fixtures
both drive this one API.

- Broker (`kafka`): the ``noida-db`` binary, run in the foreground (we own the process, SIGTERM stops it).
- Triton (`triton`): the real ``tritonserver`` of the nvidia-pytriton wheel, standalone on the project's
  model repository with the Python backend, in explicit model-control mode.
- Qdrant (`qdrant`): qdrant-client's embedded local mode. No process: ``up`` prepares the storage folder,
  and one process at a time may open it (a file lock), so nothing here keeps it open.
- Processes (`processes`, `ports`): spawned in their own session, recognised by (pid, start time).
- Workers (`worker`): `WorkerProcess` (a stream worker) and `FinetuneProcess` as child processes.
"""

from instructrec.infra.errors import BinaryNotFoundError, InfraError, PortInUseError, StartupError
from instructrec.infra.infrastructure import DownReport, Infrastructure
from instructrec.infra.ports import LOOPBACK, free_port, free_ports
from instructrec.infra.processes import ManagedProcess, run_sync
from instructrec.infra.state import COMPONENTS, Component, KafkaState, QdrantState, State, TritonState
from instructrec.infra.status import ComponentStatus
from instructrec.infra.worker import FinetuneProcess, WorkerProcess, settings_env

__all__ = [
    "COMPONENTS",
    "LOOPBACK",
    "BinaryNotFoundError",
    "Component",
    "ComponentStatus",
    "DownReport",
    "FinetuneProcess",
    "InfraError",
    "Infrastructure",
    "KafkaState",
    "ManagedProcess",
    "PortInUseError",
    "QdrantState",
    "StartupError",
    "State",
    "TritonState",
    "WorkerProcess",
    "free_port",
    "free_ports",
    "run_sync",
    "settings_env",
]
