"""Triton's own statistics of a model: where a request's time goes inside the server, and how well the dynamic
batcher gathers requests. Used by the serving and stream benchmarks and the demo's dashboard.

A snapshot is cumulative since the model loaded; figures between two snapshots are differences.
"""

from __future__ import annotations

from instructrec.adapters.triton.transports import HttpTransport

STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


async def model_stats(http_url: str, model: str, timeout_s: float = 10.0) -> dict:
    """The model's cumulative statistics snapshot (its first version listed), over HTTP."""
    transport = HttpTransport(http_url)
    try:
        stats = await transport.statistics(model, timeout_s)
    finally:
        await transport.close()
    return stats["model_stats"][0]


def per_request_ms(after: dict, before: dict | None = None) -> dict[str, float]:
    """Mean time per request inside Triton between two snapshots (without `before`: since the model loaded):
    queueing, and the backend's execute (all of the Python backend's work: input transfer to the stub, decode,
    collate, forward, output) split as Triton reports it."""

    def total(snapshot: dict | None, name: str, field: str = "ns") -> int:
        return snapshot["inference_stats"][name][field] if snapshot else 0

    count = max(1, total(after, "success", "count") - total(before, "success", "count"))
    return {name: round((total(after, name) - total(before, name)) / count / 1e6, 2) for name in STAGES}


def mean_batch_size(before: dict, after: dict) -> float:
    """Requests per forward pass between two statistics snapshots."""
    executions = after["execution_count"] - before["execution_count"]
    return round((after["inference_count"] - before["inference_count"]) / max(1, executions), 2)
