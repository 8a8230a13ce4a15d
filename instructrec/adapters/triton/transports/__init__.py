"""How the Triton client reaches the server: one base (`Transport`), one subclass per protocol."""

from __future__ import annotations

from instructrec.adapters.triton.transports.base import Transport
from instructrec.adapters.triton.transports.grpc import GrpcTransport
from instructrec.adapters.triton.transports.http import HttpTransport
from instructrec.config import TritonSettings

__all__ = ["GrpcTransport", "HttpTransport", "Transport", "make_transport"]


def make_transport(settings: TritonSettings) -> Transport:
    protocol = GrpcTransport if settings.protocol == "grpc" else HttpTransport
    return protocol(settings.url, settings)
