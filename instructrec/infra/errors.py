"""What goes wrong while starting, stopping or checking the local infrastructure."""

from __future__ import annotations


class InfraError(RuntimeError):
    """A problem the user can act on; the message says what happened and what to do."""


class BinaryNotFoundError(InfraError):
    pass


class PortInUseError(InfraError):
    pass


class StartupError(InfraError):
    pass
