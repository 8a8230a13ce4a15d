"""Triton over gRPC (tritonclient.grpc.aio): every call carries its deadline, which the server learns too."""

from __future__ import annotations

from typing import Any

from instructrec.adapters.triton.transports.base import Transport


class GrpcTransport(Transport):
    module = "tritonclient.grpc"

    def deadline(self, timeout_s: float) -> dict[str, Any]:
        return {"client_timeout": timeout_s}

    def versions_of(self, metadata: Any) -> list[str]:
        return list(metadata.versions)

    def config_of(self, response: Any) -> dict:
        return dict(response.get("config", response))

    def _as_json(self) -> dict[str, bool]:
        return {"as_json": True}
