"""Putting an accepted model into service, and taking it back out.

The swap, as Triton's explicit model control supports it (tritonserver 2.51 here; r24.08+ in production):
1. the candidate is written as the next version number in a staging folder beside the repository, fsynced,
   and renamed into the model's folder (`export_version`): a server never sees half a version, and nothing
   but numbered version folders and config.pbtxt ever appears in the model's folder;
2. `load_model()` with the repository's own config (version policy `latest: 1`): the config is unchanged, so
   Triton loads only the new version, keeps the old one serving until the new one is ready, then unloads it;
   requests in flight on the old one finish there; a failed load leaves the old one serving;
3. a probe request scored on exactly the new version (its `initialize` has already scored a warm-up one).
Then the repository keeps the newest `keep_versions` folders. A failure in 2 or 3 retires the new folder and
loads again, which brings back the newest folder left: the old version.

Why not a version-policy override (`specific: [old, new]`, probe, then `[new]`), which would probe before any
traffic reaches the new version: any change of the loaded config makes Triton reload every version, the old
one included, twice per swap. In benchmarks/soak.py the `[old, new]` load (four backend instances starting at
once beside a busy stream on two cores) outlived its two-minute timeout and left the publish hung.

A new version carries the calibration of the version it was trained from (its serving.json: the precision
and threads measured on the serving machine, `instructrec.serving.calibration`). Speed depends on the machine
and the architecture, which a fine-tune does not change; quality in that precision is what the gate judged.

Rollback (`instructrec finetune rollback`): the newest folder is renamed out of the repository and the model
loaded again, so Triton's `latest` policy — and a restarted server — falls back to the previous version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from instructrec.adapters.triton.client import TritonReranker
from instructrec.adapters.triton.repository import (
    MODEL_NAME,
    export_version,
    prune_versions,
    retire_version,
    versions,
)
from instructrec.serving.calibration import read_calibration
from instructrec.serving.scorer import warmup_request

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """The new version did not come up; the old one still serves."""


@dataclass(frozen=True)
class Published:
    version: int
    previous: int | None
    retired: tuple[int, ...]


def served_version(client_version: str, repository: Path) -> int | None:
    """The version Triton says it serves, else the newest folder."""
    if client_version.isdigit():
        return int(client_version)
    found = versions(repository)
    return found[-1] if found else None


async def publish(candidate_dir: Path, repository: Path, client: TritonReranker, keep: int) -> Published:
    old = served_version(await _served(client), repository)
    folder = export_version(candidate_dir, repository, calibration=inherited_calibration(repository, old))
    new = int(folder.name)
    try:
        await _serve(client, new)
    except Exception as error:
        log.error("version %d did not come up (%r): retiring it, version %s serves again", new, error, old)
        retire_version(repository, new)
        try:
            await client.load_model()
        except Exception:  # a load that failed never unloaded the old version; one that timed out is pending
            log.exception("could not load version %s again", old)
        raise PublishError(f"version {new} did not come up: {str(error) or type(error).__name__}") from error
    retired = prune_versions(repository, keep, protect=tuple(v for v in (old, new) if v is not None))
    return Published(new, old, tuple(retired))


def inherited_calibration(repository: Path, version: int | None) -> str | None:
    """`version`'s calibration for its successor (naming the version it was measured on), if it has one."""
    found = read_calibration(repository / MODEL_NAME / str(version)) if version is not None else None
    if found is None:
        return None
    return replace(found, inherited_from=found.inherited_from or version).to_json()


async def rollback(repository: Path, client: TritonReranker) -> int:
    """Back to the previous version: the newest is retired from the repository, the one before it served."""
    found = versions(repository)
    if len(found) < 2:
        raise PublishError(f"nothing to roll back to: {len(found)} version(s) in {repository / MODEL_NAME}")
    newest, previous = found[-1], found[-2]
    retire_version(repository, newest)
    await _serve(client, previous)
    return previous


async def reconcile(repository: Path, client: TritonReranker, accepted: int | None) -> int | None:
    """After a restart: finish a publish that was cut short, or undo it.

    A version folder newer than the one Triton serves is either the last accepted candidate (it passed the
    gate; the swap was cut short: finish it) or something no verdict accepted (retire it)."""
    found = versions(repository)
    if not found:
        return None
    serving = served_version(await _served(client), repository)
    newest = found[-1]
    if serving is None or newest <= serving:
        return serving
    if accepted == newest:
        await _serve(client, newest)
        return newest
    retire_version(repository, newest)
    return serving


async def _serve(client: TritonReranker, version: int) -> None:
    """Load the model as the repository now holds it and check that `version` is what answers."""
    serving = await client.load_model()
    if serving != str(version):
        raise PublishError(f"Triton serves version {serving or 'none'} after the load, not {version}")
    await client.probe(version, warmup_request())


async def _served(client: TritonReranker) -> str:
    try:
        return await client.refresh_model_version()
    except Exception as error:  # Triton down: the repository says what would serve
        log.warning("cannot ask Triton which version serves (%s)", error)
        return ""
