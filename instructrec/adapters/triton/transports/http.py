"""Triton over HTTP/JSON (tritonclient.http.aio, aiohttp): tensors travel as binary; calls take no deadline of
their own, so `TritonReranker` bounds each one."""

from __future__ import annotations

from typing import Any

from instructrec.adapters.triton.transports.base import Transport


class HttpTransport(Transport):
    module = "tritonclient.http"
    binary = True

    def client_options(self) -> dict[str, Any]:
        # The aio client's TLS is an ssl.SSLContext (aiohttp's), not the sync client's ssl_options
        return {} if self.tls is None else {"ssl": True, "ssl_context": self.tls.ssl_context()}

    def versions_of(self, metadata: Any) -> list[str]:
        return list(metadata.get("versions", []))
