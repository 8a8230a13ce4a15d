"""What `instructrec infra status` reports for one service."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ComponentStatus:
    name: str
    healthy: bool
    state: str  # up, down, in use, not started
    address: str = ""
    pid: int | None = None
    detail: str = ""


def reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    name = error.__class__.__name__
    return first if first.startswith(name) else f"{name}: {first}".rstrip(": ")
