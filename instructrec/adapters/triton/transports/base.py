"""What every Triton transport does, written once: the reranker's one input and two outputs, the model
control calls, the statistics. A protocol's transport names its tritonclient module and its few quirks
(how a call takes its deadline, how metadata lists versions, whether tensors travel as binary)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

import numpy as np

from instructrec.config import TritonSettings

INPUT = "REQUEST"
SCORES = "SCORES"
MODEL_VERSION = "MODEL_VERSION"


class Transport:
    """One protocol's async client, reduced to what the reranker needs. Errors propagate as raised.

    The client is created on first use, inside the running event loop (grpc.aio and aiohttp bind to it).
    `tls`: settings whose `tls` switch and files secure the connection (None, or tls off: plaintext).
    """

    module = ""  # "tritonclient.grpc" or "tritonclient.http"; its ".aio" submodule holds the async client
    binary = False  # the HTTP/JSON protocol can carry tensors as binary: ask for it

    def __init__(self, url: str, tls: TritonSettings | None = None) -> None:
        self.url = url
        self.tls = tls if tls is not None and tls.tls else None
        self._client: Any = None

    # -- what a protocol says differently

    def client_options(self) -> dict[str, Any]:
        """The client's keyword arguments beyond the URL: how it speaks TLS, in the protocol's own terms."""
        return {}

    def deadline(self, timeout_s: float) -> dict[str, Any]:
        """Keyword arguments that bound one call on the server side too (none where the protocol has no way)."""
        return {}

    def versions_of(self, metadata: Any) -> list[str]:
        raise NotImplementedError

    def config_of(self, response: Any) -> dict:
        """The model configuration as a JSON-like dict, from the protocol's answer."""
        return dict(response)

    # -- shared

    def _get(self) -> Any:
        if self._client is None:
            client = import_module(f"{self.module}.aio").InferenceServerClient
            self._client = client(self.url, **self.client_options())
        return self._client

    def _binary(self) -> dict[str, bool]:
        return {"binary_data": True} if self.binary else {}

    async def infer(
        self, model: str, version: str, request: bytes, timeout_s: float
    ) -> tuple[np.ndarray, str]:
        """One rerank request → (its scores, the version that answered)."""
        protocol = import_module(self.module)
        data = protocol.InferInput(INPUT, [1, 1], "BYTES")
        data.set_data_from_numpy(
            np.array([[request]], dtype=np.object_), **self._binary()
        )  # [batch 1, dims [1]]
        outputs = [protocol.InferRequestedOutput(name, **self._binary()) for name in (SCORES, MODEL_VERSION)]
        result = await self._get().infer(
            model, [data], model_version=version, outputs=outputs, **self.deadline(timeout_s)
        )
        return result.as_numpy(SCORES)[0], _version_of(result)

    async def is_model_ready(self, model: str, version: str, timeout_s: float) -> bool:
        return await self._get().is_model_ready(model, version, **self.deadline(timeout_s))

    async def model_versions(self, model: str, timeout_s: float) -> list[str]:
        """The versions the server has ready (the model metadata's list)."""
        return self.versions_of(await self._get().get_model_metadata(model, **self.deadline(timeout_s)))

    async def model_config(self, model: str, timeout_s: float) -> dict:
        """The configuration of the model as loaded (its version policy included)."""
        return self.config_of(
            await self._get().get_model_config(model, **self.deadline(timeout_s), **self._as_json())
        )

    async def load_model(self, model: str, config: str | None, timeout_s: float) -> None:
        await self._get().load_model(model, config=config, **self.deadline(timeout_s))

    async def unload_model(self, model: str, timeout_s: float) -> None:
        await self._get().unload_model(model, **self.deadline(timeout_s))

    async def statistics(self, model: str, timeout_s: float) -> dict:
        """Triton's inference statistics of `model` (every version), as the JSON the server reports."""
        return await self._get().get_inference_statistics(
            model, **self.deadline(timeout_s), **self._as_json()
        )

    def _as_json(self) -> dict[str, bool]:
        return {}

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()


def _version_of(result: Any) -> str:
    versions = result.as_numpy(MODEL_VERSION)
    if versions is None or not versions.size:
        return ""
    value = versions.reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else str(value)
