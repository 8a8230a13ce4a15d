"""Result tables: one per protocol, every method, every metric, training wall time."""

from __future__ import annotations

from rich.table import Table

COLUMNS = (
    "NDCG@1",
    "NDCG@5",
    "NDCG@10",
    "Recall@1",
    "Recall@5",
    "Recall@10",
    "MRR@10",
    "Recall@20",
    "Recall@50",
)
PROTOCOLS = (
    ("full", "full ranking, history masked (LlamaRec's protocol)"),
    ("full_unmasked", "full ranking, history not masked"),
    ("sampled", "sampled: target + 19 random negatives, shuffled"),
)


def tables(
    dataset: str, results: dict[str, dict[str, dict[str, float]]], seconds: dict[str, float]
) -> list[Table]:
    return [
        table(f"{dataset} — {title}", results[key], seconds) for key, title in PROTOCOLS if key in results
    ]


def table(title: str, rows: dict[str, dict[str, float]], seconds: dict[str, float]) -> Table:
    out = Table(title=title)
    out.add_column("method")
    columns = [c for c in COLUMNS if any(c in metrics for metrics in rows.values())]
    for column in columns:
        out.add_column(column, justify="right")
    out.add_column("train s", justify="right")
    for method, metrics in rows.items():
        cells = [f"{metrics[c]:.4f}" if c in metrics else "" for c in columns]
        out.add_row(method, *cells, f"{seconds[method]:.0f}" if method in seconds else "")
    return out
