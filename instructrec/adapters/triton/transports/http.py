"""Triton over HTTP/JSON (tritonclient.http.aio, aiohttp): tensors travel as binary; calls take no deadline of
their own, so `TritonReranker` bounds each one."""

from __future__ import annotations

from typing import Any

from instructrec.adapters.triton.transports.base import Transport


class HttpTransport(Transport):
    module = "tritonclient.http"
    binary = True

    def versions_of(self, metadata: Any) -> list[str]:
        return list(metadata.get("versions", []))
