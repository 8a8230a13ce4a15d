"""The reranker on Triton: the async client (`client`), how it reaches the server (`transports`), and the
model repository Triton serves from (`repository`: exporting versions, hot swaps)."""

from instructrec.adapters.triton.client import (
    CircuitBreaker,
    CircuitOpen,
    RerankerRequestError,
    RerankerUnavailable,
    TritonReranker,
)

__all__ = ["CircuitBreaker", "CircuitOpen", "RerankerRequestError", "RerankerUnavailable", "TritonReranker"]
