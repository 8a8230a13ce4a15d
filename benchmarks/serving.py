"""Serving benchmark: the reranker on a real tritonserver, on this machine.

    python benchmarks/serving.py [--json PATH] [--reranker DIR] [--requests N] [--quick]

Starts its own tritonserver (the infra API, explicit model control) on a temporary model repository holding
the exported reranker (the offline default model, or `--reranker DIR`, e.g. artifacts/ml-latest-small/
reranker/best) twice: `instructrec_reranker` with dynamic batching and `instructrec_reranker_unbatched`, the
same weights and backend without it (every request its own forward pass). Requests are real instructions
from ml-latest-small in the shape the stream sends (`harness.Workload`): explicit preferences from the
user's interactions before their last one and 10 of those items shown, a request text on half of them, and
20 candidates (the last item and 19 random items they never rated) described by title, categories and tags.

Measured, in one run:
- latency p50/p99 of one request of 20 candidates, sent one after another (gRPC aio client);
- throughput (requests/s) at 1, 4, 16 and 64 concurrent requests, and the same at 16 without batching
  (`batched_vs_unbatched`); where the time goes per request inside Triton (queue, backend compute);
- in process (server stopped, same thread count): FLOPs of one request's forward pass (FlopCounterMode),
  the achieved GFLOP/s next to a matmul probe, and the decode/collate share;
- `vs_generate`: one-pass scoring against generate-then-parse with the same model (greedy generation of
  ~20 titles' worth of tokens, mapped back to candidates by best title match);
- int8 dynamic quantisation and bfloat16 against float32 on the same requests: Kendall tau, top-10
  overlap, top-1 agreement and speed.
JSON keys: p50_ms, p99_ms, batched_vs_unbatched, vs_generate, throughput {"1","4","16","64"},
gflops_per_request, achieved_gflops, matmul_gflops, served_gflops, served_over_matmul (served GFLOP/s over the
matmul probe: a ratio that holds across machines), and the details under the other keys.
"""

from __future__ import annotations

import asyncio
import copy
import difflib
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import ForeignCpu, Workload, arguments, finish  # the benchmarks' shared library module
from rich.console import Console
from rich.table import Table

from instructrec.adapters.triton.statistics import mean_batch_size, model_stats, per_request_ms

REPO = Path(__file__).resolve().parent.parent
MODEL = "instructrec_reranker"
UNBATCHED = "instructrec_reranker_unbatched"
CONCURRENCY = (1, 4, 16, 64)


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument(
        "--reranker", type=Path, default=None, help="a saved reranker (default: the offline default)"
    )
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument(
        "--requests", type=int, default=300, help="sequential requests for the latency figures"
    )
    parser.add_argument(
        "--quick", action="store_true", help="few requests: checks the script, not the machine"
    )
    parser.add_argument("--dtype", default=None, help="serve with this dtype parameter (float32, bfloat16)")
    parser.add_argument("--quantize", default=None, help="serve with this quantize parameter (none, int8)")
    args = parser.parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so the tritonserver this script started is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    console = Console(width=max(Console().width, 120))  # the table stays readable when piped to a file

    from instructrec.serving.options import ServingOptions, set_omp_wait_policy

    set_omp_wait_policy(ServingOptions().omp_wait_policy)  # in process as in the backend (before torch loads)
    import torch

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)  # the same count the backend uses (parameter threads = 0: every core)
    sizes = Sizes.quick() if args.quick else Sizes(latency=args.requests)
    console.print(f"[bold]serving benchmark[/] · {threads} cores · load average {os.getloadavg()[0]:.2f}")
    workload = Workload.build(args.data_root, sizes.instructions)

    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        root = Path(tmp)
        reranker_dir = args.reranker or save_default_model(root / "default-reranker")
        results: dict = {
            "threads": threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "load_average_start": round(os.getloadavg()[0], 2),
        }
        overrides = {
            key: value for key, value in (("dtype", args.dtype), ("quantize", args.quantize)) if value
        }
        results["served_parameters"] = overrides or "config.pbtxt defaults"
        results.update(serve_and_measure(root, reranker_dir, workload, sizes, console, overrides))
        console.print({key: value for key, value in results.items() if key != "server_per_request_ms"})
        results.update(in_process(reranker_dir, workload, sizes, console))
    results["load_average_end"] = round(os.getloadavg()[0], 2)
    results["batched_vs_unbatched"] = round(
        results["batched_throughput_16"] / results["unbatched_throughput_16"], 2
    )
    results["served_gflops"] = round(results["gflops_per_request"] / (results["p50_ms"] / 1000), 1)
    # The share of this machine's matmul speed that one served request achieves: comparable across machines.
    results["served_over_matmul"] = round(results["served_gflops"] / results["matmul_gflops"], 3)
    return finish(console, report(results), results, args.json_path)


class Sizes:
    def __init__(
        self, latency: int = 300, throughput: int = 192, generate: int = 5, quality: int = 120
    ) -> None:
        self.latency, self.throughput, self.generate, self.quality = latency, throughput, generate, quality
        self.instructions = max(latency, throughput, quality)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(latency=20, throughput=32, generate=1, quality=10)


def save_default_model(path: Path) -> Path:
    from instructrec.model.reranker import default_model

    default_model().save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------- on Triton


def serve_and_measure(
    root: Path,
    reranker_dir: Path,
    workload: Workload,
    sizes: Sizes,
    console: Console,
    overrides: dict[str, str],
) -> dict:
    from instructrec.adapters.triton.repository import (
        copy_repository,
        default_repository,
        export_version,
        set_parameters,
    )
    from instructrec.config import InfraSettings, Settings
    from instructrec.infra import Infrastructure

    repository = copy_repository(default_repository(), root / "repository")
    export_version(reranker_dir, repository, 1, link=True, overwrite=True)
    set_parameters(repository / MODEL / "config.pbtxt", overrides)
    add_unbatched_model(repository, reranker_dir)
    settings = Settings(
        state_dir=root / "state",
        infra=InfraSettings(model_repository=repository, models=[MODEL, UNBATCHED], start_timeout_s=300),
    )
    infrastructure = Infrastructure(settings)
    with console.status("starting tritonserver and loading both models…"):
        started = time.perf_counter()
        state = infrastructure.up(components=["triton"])
    console.print(f"tritonserver ready with both models in {time.perf_counter() - started:.1f} s")
    try:
        return asyncio.run(measure_served(state.triton, workload, sizes, console))
    finally:
        report = infrastructure.down(components=["triton"])
        if not report.ok:
            console.print(f"[red]tritonserver did not stop cleanly: {report.problems}")


def add_unbatched_model(repository: Path, reranker_dir: Path) -> None:
    """The same backend and weights under another name, with dynamic batching removed from its config."""
    from instructrec.adapters.triton.repository import export_version

    config = (repository / MODEL / "config.pbtxt").read_text()
    config = re.sub(r"dynamic_batching\s*\{[^}]*\}", "", config)
    config = config.replace(f'name: "{MODEL}"', f'name: "{UNBATCHED}"')
    (repository / UNBATCHED).mkdir()
    (repository / UNBATCHED / "config.pbtxt").write_text(config)
    export_version(reranker_dir, repository, 1, model=UNBATCHED, link=True)


async def measure_served(state, workload: Workload, sizes: Sizes, console: Console) -> dict:
    from instructrec.adapters.triton.client import TritonReranker
    from instructrec.config import TritonSettings

    requests = workload.requests
    settings = TritonSettings(url=state.grpc_url, protocol="grpc", timeout_s=60, retries=0)
    unbatched_settings = settings.model_copy(update={"reranker_model": UNBATCHED})
    out: dict = {"foreign_cores": {}}
    async with TritonReranker(settings) as reranker, TritonReranker(unbatched_settings) as unbatched:
        await reranker.score(requests[:4])  # connection set-up, not part of any figure
        await unbatched.score(requests[:2])
        with console.status("latency: sequential requests…"), ForeignCpu(state.pid) as foreign:
            latencies = []
            for request in requests[: sizes.latency]:
                started = time.perf_counter()
                await reranker.score_one(request)
                latencies.append(time.perf_counter() - started)
        out["foreign_cores"]["latency"] = foreign.cores
        out["p50_ms"] = round(float(np.percentile(latencies, 50)) * 1000, 1)
        out["p99_ms"] = round(float(np.percentile(latencies, 99)) * 1000, 1)
        out["mean_ms"] = round(float(np.mean(latencies)) * 1000, 1)
        out["latency_requests"] = len(latencies)
        out["server_per_request_ms"] = per_request_ms(await model_stats(state.http_url, MODEL))
        out["model_version"] = reranker.model_version

        out["throughput"], out["mean_batch_size"] = {}, {}
        for concurrency in CONCURRENCY:
            with console.status(f"throughput at {concurrency} concurrent…"), ForeignCpu(state.pid) as foreign:
                before = await model_stats(state.http_url, MODEL)
                out["throughput"][str(concurrency)] = await throughput(
                    reranker, requests, concurrency, sizes.throughput
                )
                after = await model_stats(state.http_url, MODEL)
            out["mean_batch_size"][str(concurrency)] = mean_batch_size(before, after)
            out["foreign_cores"][f"throughput_{concurrency}"] = foreign.cores

        # Batched against unbatched at 16 concurrent, alternated so that a change in the machine's load
        # hits both alike; each side's best round counts (the one least disturbed by other processes).
        rounds: dict[str, list[float]] = {"batched": [], "unbatched": []}
        with console.status("batched against unbatched…"), ForeignCpu(state.pid) as foreign:
            for _ in range(2):
                rounds["batched"].append(await throughput(reranker, requests, 16, sizes.throughput))
                rounds["unbatched"].append(await throughput(unbatched, requests, 16, sizes.throughput))
        out["batched_vs_unbatched_rounds"] = rounds
        out["foreign_cores"]["batched_vs_unbatched"] = foreign.cores
        out["batched_throughput_16"] = max(rounds["batched"])
        out["unbatched_throughput_16"] = max(rounds["unbatched"])
        out["unbatched_throughput_1"] = await throughput(unbatched, requests, 1, sizes.throughput)
    return out


async def throughput(reranker, requests: list[bytes], concurrency: int, at_least: int) -> float:
    """Requests per second with `concurrency` requests always in flight (`at_least` requests in all)."""
    total = max(at_least, 3 * concurrency)
    queue = iter(requests[i % len(requests)] for i in range(total))

    async def worker() -> None:
        for request in queue:  # the shared iterator hands each request to exactly one worker
            await reranker.score_one(request)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return round(total / (time.perf_counter() - started), 2)


# ------------------------------------------------------------------------------------------- in process


def in_process(reranker_dir: Path, workload: Workload, sizes: Sizes, console: Console) -> dict:
    from instructrec.model.reranker import Reranker
    from instructrec.serving.scorer import ServingScorer
    from instructrec.serving.wire import decode_request

    reranker = Reranker.from_pretrained(reranker_dir).eval()
    scorer = ServingScorer(reranker)
    request = workload.requests[0]
    scorer.score([request])  # warm-up

    out: dict = {}
    with ForeignCpu() as foreign:  # the whole in-process part
        with console.status("FLOPs, matmul probe and in-process timing…"):
            decoded = decode_request(request)
            batch = scorer.tokenizer.collate([decoded.instruction], decoded.titles.__getitem__, lambda _: 0)
            flops = flop_count(reranker, batch)
            out["gflops_per_request"] = round(flops / 1e9, 3)
            out["encoder_tokens"], out["decoder_tokens"] = (
                int(batch.enc_ids.shape[1]),
                int(batch.dec_ids.shape[1]),
            )
            forward_s = median_seconds(lambda: forward(reranker, batch), repeat=20)
            out["forward_ms"] = round(forward_s * 1000, 1)
            out["decode_collate_ms"] = round(
                median_seconds(lambda: collate(scorer, request), repeat=50) * 1000, 2
            )
            out["achieved_gflops"] = round(flops / forward_s / 1e9, 1)
            out["matmul_gflops"] = round(matmul_gflops(), 1)
            out["matmul_gflops_model_shape"] = round(matmul_gflops(batch.enc_ids.shape[1], 384, 1536), 1)
            per_request = {}
            for size in (1, 4, 16):
                chunk = workload.requests[:size]
                per_request[str(size)] = round(
                    median_seconds(lambda c=chunk: scorer.score(c), repeat=5) / size * 1000, 1
                )
            out["in_process_ms_per_request_by_batch"] = per_request
        with console.status("generate-then-parse with the same model…"):
            out.update(versus_generate(reranker, scorer, workload, sizes))
        with console.status("int8 and bfloat16 against float32…"):
            out["precision"] = precision_study(reranker, workload, sizes)
    out["foreign_cores_in_process"] = foreign.cores
    return out


def forward(reranker, batch) -> None:
    import torch

    with torch.inference_mode():
        reranker(batch)


def collate(scorer, request: bytes) -> None:
    from instructrec.serving.wire import decode_request

    decoded = decode_request(request)
    scorer.tokenizer.collate([decoded.instruction], decoded.titles.__getitem__, lambda _: 0)


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def flop_count(reranker, batch) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        reranker(batch)
    return counter.get_total_flops()


def matmul_gflops(m: int = 1024, k: int = 1024, n: int = 1024, seconds: float = 1.0) -> float:
    """float32 matmul throughput of this process (same thread count as the model)."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - started) / 1e9


# -------------------------------------------------------------------------------- generate-then-parse


def versus_generate(reranker, scorer, workload: Workload, sizes: Sizes) -> dict:
    """One-pass scoring against generating a ranked list of titles with the same seq2seq model.

    The generator reads the whole instruction, candidates included, and greedily writes as many tokens as
    20 titles take (EOS suppressed: an untrained model would otherwise stop at once and flatter the
    comparison); the text is split and each piece mapped to the candidate whose title matches it best.
    """
    import torch

    tokenizer = reranker.tokenizer
    start = reranker.text_tokenizer().decoder_start_id
    generate_s, one_pass_s, lengths = [], [], []
    for ins, request in list(zip(workload.instructions, workload.requests, strict=True))[: sizes.generate]:
        titles = [workload.title_of(c) for c in ins.candidates]
        budget = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in titles)
        encoded = tokenizer(ins.text(workload.title_of), return_tensors="pt", truncation=True, max_length=512)
        started = time.perf_counter()
        with torch.inference_mode():
            generated = reranker.seq2seq.generate(
                **encoded,
                max_new_tokens=budget,
                min_new_tokens=budget,
                do_sample=False,
                num_beams=1,
                decoder_start_token_id=start,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.sep_token_id or tokenizer.eos_token_id,
            )
        ranking = parse_ranking(tokenizer.decode(generated[0], skip_special_tokens=True), titles)
        generate_s.append(time.perf_counter() - started)
        lengths.append(int(generated.shape[1]))
        assert len(ranking) == len(titles)
        one_pass_s.append(median_seconds(lambda r=request: scorer.score([r]), repeat=5))
    return {
        "vs_generate": round(float(np.mean(generate_s)) / float(np.mean(one_pass_s)), 1),
        "generate_ms": round(float(np.mean(generate_s)) * 1000, 1),
        "one_pass_ms": round(float(np.mean(one_pass_s)) * 1000, 1),
        "generated_tokens": round(float(np.mean(lengths)), 1),
    }


def parse_ranking(text: str, titles: list[str]) -> list[int]:
    """Candidate positions in the order the text names them (best title match per piece), then the rest."""
    ranking: list[int] = []
    for piece in re.split(r"[,;\n]|\(\w\)", text):
        piece = piece.strip().lower()
        if not piece:
            continue
        scores = [difflib.SequenceMatcher(None, piece, t.lower()).ratio() for t in titles]
        best = int(np.argmax(scores))
        if best not in ranking:
            ranking.append(best)
    return ranking + [i for i in range(len(titles)) if i not in ranking]


# ----------------------------------------------------------------------------------------- precisions


def precision_study(reranker, workload: Workload, sizes: Sizes) -> dict:
    import torch

    from instructrec.serving.scorer import ServingScorer, quantize_int8

    requests = workload.requests[: sizes.quality]
    variants = {
        "float32": ServingScorer(reranker),
        "int8": ServingScorer(quantize_int8(copy.deepcopy(reranker))),
        "bfloat16": ServingScorer(copy.deepcopy(reranker).to(torch.bfloat16)),
    }
    scores = {
        name: [s for i in range(0, len(requests), 8) for s in scorer.score(requests[i : i + 8])]
        for name, scorer in variants.items()
    }
    out = {}
    for name, scorer in variants.items():
        scorer.score(requests[:2])
        ms = median_seconds(lambda s=scorer: s.score([requests[0]]), repeat=15) * 1000
        pairs = list(zip(scores["float32"], scores[name], strict=True))
        out[name] = {
            "ms_per_request": round(ms, 1),
            "kendall_tau": _mean(kendall_tau(a, b) for a, b in pairs),
            "top10_overlap": _mean(top_overlap(a, b, 10) for a, b in pairs),
            "top1_agreement": _mean(float(a.argmax() == b.argmax()) for a, b in pairs),
        }
    return out


def _mean(values) -> float:
    return round(float(np.mean(list(values))), 3)


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-a between two score vectors over the same candidates."""
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    n = len(a)
    return float((da * db).sum() / (n * (n - 1)))


def top_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


# --------------------------------------------------------------------------------------------- report


def report(results: dict) -> Table:
    table = Table(title="InstructRec reranker serving (tritonserver, Python backend, this machine)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    throughput = results["throughput"]
    rows = [
        ("latency p50, 1 request × 20 candidates", f"{results['p50_ms']} ms", "≤ 60 ms"),
        ("latency p99", f"{results['p99_ms']} ms", "≤ 150 ms"),
        *[(f"throughput at {c} concurrent", f"{throughput[str(c)]} req/s", "") for c in CONCURRENCY],
        (
            "mean batch size at 1 · 4 · 16 · 64 concurrent",
            " · ".join(map(str, results["mean_batch_size"].values())),
            "",
        ),
        (
            "at 16 concurrent, best of 2 alternated rounds: batched · unbatched",
            f"{results['batched_throughput_16']} · {results['unbatched_throughput_16']} req/s",
            "",
        ),
        ("batched / unbatched throughput (16 concurrent)", f"{results['batched_vs_unbatched']}×", "≥ 2×"),
        ("one-pass vs generate-then-parse (time ratio)", f"{results['vs_generate']}×", "≥ 20×"),
        ("FLOPs per request", f"{results['gflops_per_request']} GFLOP", ""),
        ("achieved in-process (forward only)", f"{results['achieved_gflops']} GFLOP/s", ""),
        ("achieved served (at p50)", f"{results['served_gflops']} GFLOP/s", ""),
        ("matmul probe, 1024³ float32", f"{results['matmul_gflops']} GFLOP/s", "within 3×"),
        ("served / matmul probe", f"{results['served_over_matmul']:.0%}", ""),
        (
            "in-process forward / decode+collate",
            f"{results['forward_ms']} / {results['decode_collate_ms']} ms",
            "",
        ),
        ("inside Triton per request (ms)", json.dumps(results["server_per_request_ms"]), ""),
    ]
    for name, figures in results["precision"].items():
        rows.append(
            (
                f"{name}: ms · tau · top-10 · top-1",
                f"{figures['ms_per_request']} · {figures['kendall_tau']} · {figures['top10_overlap']} · "
                f"{figures['top1_agreement']}",
                "",
            )
        )
    foreign = {**results["foreign_cores"], "in_process": results["foreign_cores_in_process"]}
    rows.append(("cores other processes used, by phase", json.dumps(foreign), "0 on a quiet machine"))
    for row in rows:
        table.add_row(*row)
    table.caption = (
        f"load average {results['load_average_start']} → {results['load_average_end']} · "
        f"{results['threads']} threads"
    )
    return table


if __name__ == "__main__":
    sys.exit(main())
