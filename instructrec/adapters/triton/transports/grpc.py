"""Triton over gRPC (tritonclient.grpc.aio): every call carries its deadline, which the server learns too."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from instructrec.adapters.triton.transports.base import Transport


class GrpcTransport(Transport):
    module = "tritonclient.grpc"

    def client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"channel_args": channel_args()}
        if self.tls is None:
            return options
        # tritonclient reads the PEM files itself; a None leaves gRPC's bundled roots and no client certificate
        files = (self.tls.ssl_cafile, self.tls.ssl_keyfile, self.tls.ssl_certfile)
        root, key, chain = (str(path) if path else None for path in files)
        return options | {
            "ssl": True,
            "root_certificates": root,
            "private_key": key,
            "certificate_chain": chain,
        }

    def deadline(self, timeout_s: float) -> dict[str, Any]:
        return {"client_timeout": timeout_s}

    def versions_of(self, metadata: Any) -> list[str]:
        return list(metadata.versions)

    def config_of(self, response: Any) -> dict:
        return dict(response.get("config", response))

    def _as_json(self) -> dict[str, bool]:
        return {"as_json": True}


# gRPC waits longer and longer between attempts to reconnect a channel whose server is gone (up to 120 s by
# default): after a minute's outage, a Triton that was back stayed unused until the channel's next attempt,
# every probe of the circuit breaker refused by the channel itself (tests/integration/test_faults.py bounds
# the recovery). Capped, a returning server is used within seconds; an attempt to a server that is still
# away costs one refused connection.
MAX_RECONNECT_BACKOFF_MS = 2000


def channel_args() -> list[tuple[str, Any]]:
    """tritonclient's own channel options (which `channel_args` replaces), with the reconnect backoff capped."""
    client = import_module(GrpcTransport.module)
    keepalive = client.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", client.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", client.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]
