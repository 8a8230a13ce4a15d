"""The architecture contract (pyproject.toml, [tool.importlinter]) holds, and it would catch a breach.

The contract: the method imports no Kafka, Faust, Qdrant, Triton or network code; production code never
imports the local development infrastructure; the packages are layered (CLI > infra > workers > streams >
adapters > method > contracts); no package has an import cycle among its modules. Function-level imports
count; imports under `if TYPE_CHECKING:` do not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("instructrec", "streams", "workers")


def lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the packages found under `root` (first on the path: a copy shadows the checkout)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    lint_imports = Path(sys.executable).parent / "lint-imports"  # import-linter's console script, in the venv
    command = [str(lint_imports), "--no-cache", "--no-logo", "--config", "pyproject.toml"]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_architecture_contract_holds() -> None:
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


BREACHES = {
    # (module that gains an import, the import, the contract that must break)
    "the method imports Kafka": ("instructrec/model/batch.py", "import aiokafka", "The method is pure"),
    "the method reaches the network": (
        "instructrec/retrieval/blend.py",
        "import urllib.request",
        "The method is pure",
    ),
    "a worker imports the local infra": ("workers/replay.py", "import instructrec.infra", "Production never"),
    "the stream imports a worker": ("streams/services.py", "import workers.index", "Layers"),
    "a cycle inside the method": (
        "instructrec/data/split.py",
        "import instructrec.instructions",
        "No import cycles",
    ),
    "a cycle hidden in a function": (
        "streams/state/context.py",
        "def _late():\n    import streams.state.served",
        "No import cycles",
    ),
}


@pytest.mark.parametrize("breach", sorted(BREACHES))
def test_a_breach_breaks_the_contract(copy: Path, breach: str) -> None:
    module, line, contract = BREACHES[breach]
    path = copy / module
    original = path.read_text()
    if (
        breach == "a cycle hidden in a function"
    ):  # the other direction exists: served imports nothing of context
        (copy / "streams/state/served.py").write_text(
            (copy / "streams/state/served.py").read_text()
            + "\n\ndef _back():\n    import streams.state.context\n"
        )
    path.write_text(original + "\n\n" + line + "\n")
    try:
        result = lint(copy)
    finally:
        path.write_text(original)
        if breach == "a cycle hidden in a function":
            shutil.copy2(REPO / "streams/state/served.py", copy / "streams/state/served.py")
    assert result.returncode == 1, result.stdout
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(contract in line for line in broken), result.stdout
