"""What the benchmark scripts share (a library module, not a script): the serving workload of real
instructions, and how much of the machine other processes used while a phase ran.

Scripts import it by name (`from harness import ...`): Python puts a script's own folder on the path.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path


class Workload:
    """Real instructions over ml-latest-small and their wire form."""

    def __init__(self, dataset, instructions) -> None:
        from instructrec.serving.wire import encode_request

        self.dataset = dataset
        self.instructions = instructions
        self.ids = [item.id for item in dataset.items]
        self.titles = [item.display_title for item in dataset.items]
        self.requests = [
            encode_request(ins, self.ids.__getitem__, self.titles.__getitem__) for ins in instructions
        ]

    @classmethod
    def build(cls, data_root: str, n: int, seed: int = 0) -> Workload:
        from instructrec.data import load
        from instructrec.instructions import request_instruction

        dataset = load("ml-latest-small", root=data_root)
        rng = random.Random(seed)
        instructions = []
        while len(instructions) < n:
            user = rng.randrange(dataset.n_users)
            history = dataset.histories[user]
            seen = {x.item for x in history}
            negatives = set()
            while len(negatives) < 19:
                item = rng.randrange(dataset.n_items)
                if item not in seen:
                    negatives.add(item)
            candidates = [history[-1].item, *sorted(negatives)]
            instructions.append(request_instruction(history[-11:-1], candidates, seed=len(instructions)))
        return cls(dataset, instructions)

    def title_of(self, item: int) -> str:
        return self.titles[item]


class ForeignCpu:
    """How many cores other processes kept busy while a phase ran: the machine is shared, so every figure
    says how shared it was. Ours: this process and the tritonserver session (server and backend stubs)."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self.cores = 0.0

    def __enter__(self) -> ForeignCpu:
        self._start = (time.perf_counter(), _machine_busy_ticks(), self._own_ticks())
        return self

    def __exit__(self, *exc_info: object) -> None:
        elapsed = time.perf_counter() - self._start[0]
        busy = _machine_busy_ticks() - self._start[1]
        own = self._own_ticks() - self._start[2]
        self.cores = round(max(0.0, busy - own) / os.sysconf("SC_CLK_TCK") / elapsed, 2)

    def _own_ticks(self) -> int:
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile
                continue
            pid, session = int(entry.name), int(fields[3])
            if pid == os.getpid() or (self.server_pid is not None and session == self.server_pid):
                total += int(fields[11]) + int(fields[12])  # utime + stime, all threads
        return total


def _machine_busy_ticks() -> int:
    """All CPUs' busy time: /proc/stat's first line less idle and iowait."""
    fields = Path("/proc/stat").read_text().split()[1:9]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
    return user + nice + system + irq + softirq + steal


def build_catalog(settings, dataset, limit: int | None, cache_dir: Path) -> tuple[int, bool]:
    """Item vectors straight into the worker's Qdrant storage (what the catalog agent would write)."""
    from instructrec.adapters.qdrant import IndexedItem, ItemIndex
    from instructrec.data.dataset import item_text
    from instructrec.retrieval.text import TextRetriever
    from streams.services import load_collaborative

    items = dataset.items[:limit] if limit else dataset.items
    texts = TextRetriever(cache_dir=cache_dir).fit_texts([item_text(i) for i in items], dataset.name)
    collaborative = load_collaborative(settings)
    cf_dim = collaborative.dim if collaborative else settings.qdrant.cf_dim
    with ItemIndex(settings.qdrant, cf_dim=cf_dim) as index:
        index.ensure_collection()
        index.upsert(
            [
                IndexedItem(
                    item.id,
                    item.display_title,
                    item.genres,
                    item.year,
                    texts.vectors[n],
                    collaborative.vector_of(item.id) if collaborative else None,
                )
                for n, item in enumerate(items)
            ]
        )
    return len(items), collaborative is not None
