"""Triton over gRPC (tritonclient.grpc.aio): every call carries its deadline, which the server learns too."""

from __future__ import annotations

from typing import Any

from instructrec.adapters.triton.transports.base import Transport


class GrpcTransport(Transport):
    module = "tritonclient.grpc"

    def client_options(self) -> dict[str, Any]:
        if self.tls is None:
            return {}
        # tritonclient reads the PEM files itself; a None leaves gRPC's bundled roots and no client certificate
        files = (self.tls.ssl_cafile, self.tls.ssl_keyfile, self.tls.ssl_certfile)
        root, key, chain = (str(path) if path else None for path in files)
        return {"ssl": True, "root_certificates": root, "private_key": key, "certificate_chain": chain}

    def deadline(self, timeout_s: float) -> dict[str, Any]:
        return {"client_timeout": timeout_s}

    def versions_of(self, metadata: Any) -> list[str]:
        return list(metadata.versions)

    def config_of(self, response: Any) -> dict:
        return dict(response.get("config", response))

    def _as_json(self) -> dict[str, bool]:
        return {"as_json": True}
