"""Continuous batching measured: aggregate tokens/s and per-stream latency against concurrency.

For each mode and each concurrency c, c requests (each its own seeded prompt, EOS ignored so
every request makes the same number of tokens) are submitted to one engine at once; the run
ends when all have finished. Reported per (mode, c), medians over `--runs` runs: aggregate
tokens/s (all tokens / wall time), its ratio to c = 1, per-stream time to the first chunk
(the first 1 + N ids: one prefill plus one burst in Boost/Turbo), the median and p95 gap
between consecutive chunks of 1 + N ids, and per-stream tokens/s. Writes results.json and
results.md into benchmarks/results/<device>-<preset>-batching-<date>/ (or --out).

    python -m benchmarks.bench_batching --device cpu --preset small --runs 3
"""
from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import time
from pathlib import Path

from benchmarks import harness

MODES = ("vanilla", "balance", "boost", "turbo")
COLUMNS: list[harness.Column] = [
    ("mode", "mode", ""), ("concurrency", "concurrency", "d"),
    ("aggregate tokens/s", "aggregate_tokens_per_s", ".1f"), ("vs 1 stream", "speedup", ".2f"),
    ("per-stream tokens/s", "stream_tokens_per_s", ".1f"), ("first chunk ms", "first_chunk_ms", ".1f"),
    ("chunk gap ms p50", "chunk_gap_p50_ms", ".1f"), ("chunk gap ms p95", "chunk_gap_p95_ms", ".1f"),
    ("queue ms (max)", "queue_max_ms", ".1f"),
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_run(engine, mode: str, concurrency: int, prompt_len: int, new_tokens: int, seed: int) -> dict:
    chunk = 1 + engine.cfg.num_mtp_modules
    start = time.perf_counter()
    handles = [engine.submit(harness.prompt_ids(engine, prompt_len, seed + i), mode=mode, max_new_tokens=new_tokens,
                             ignore_eos=True) for i in range(concurrency)]
    results = [h.result() for h in handles]
    wall = time.perf_counter() - start
    gaps, first_chunks = [], []
    for h in handles:
        marks = h.token_times[chunk - 1::chunk]  # the read that completed each chunk of 1 + N ids
        first_chunks.append(marks[0])
        gaps += [b - a for a, b in zip(marks, marks[1:])]
    tokens = sum(len(r.tokens) for r in results)
    return {"aggregate_tokens_per_s": tokens / wall, "wall_s": wall,
            "stream_tokens_per_s": statistics.median(r.timings["tokens_per_s"] for r in results),
            "first_chunk_ms": 1e3 * statistics.median(first_chunks),
            "chunk_gap_p50_ms": 1e3 * statistics.median(gaps) if gaps else None,
            "chunk_gap_p95_ms": 1e3 * percentile(gaps, 0.95) if gaps else None,
            "queue_max_ms": 1e3 * max(r.timings["queue_s"] for r in results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=132)
    parser.add_argument("--max-seq-len", type=int, default=None)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    modes = args.modes.split(",")

    from vita_audio_runtime.engine import Engine

    max_seq_len = args.max_seq_len or args.prompt_len + args.new_tokens + 16
    engine = Engine.from_pretrained(args.preset, device=args.device, dtype=args.dtype, backend=args.backend,
                                    max_seq_len=max_seq_len, max_batch=max(levels), max_queue=0)
    for mode in modes:  # warm-up: every step shape once (graph capture on a GPU)
        for c in levels:
            one_run(engine, mode, c, args.prompt_len, min(args.new_tokens, 2 * (1 + engine.cfg.num_mtp_modules)), 0)
    runs: dict[tuple[str, int], list[dict]] = {(m, c): [] for m in modes for c in levels}
    for r in range(args.runs):  # interleaved, so drifts of the machine hit every setting alike
        for mode in modes:
            for c in levels:
                runs[mode, c].append(one_run(engine, mode, c, args.prompt_len, args.new_tokens, 1000 * (r + 1)))
    rows = []
    for mode in modes:
        for c in levels:
            row = {"mode": mode, "concurrency": c}
            for key in runs[mode, c][0]:
                values = [x[key] for x in runs[mode, c] if x[key] is not None]
                row[key] = statistics.median(values) if values else None
            row["aggregate_runs"] = [x["aggregate_tokens_per_s"] for x in runs[mode, c]]
            rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["mode"] == row["mode"] and r["concurrency"] == levels[0])
        row["speedup"] = row["aggregate_tokens_per_s"] / base["aggregate_tokens_per_s"]

    settings = harness.Settings(device=args.device, preset=args.preset, dtype=str(engine.model.dtype))
    env = harness.environment(settings)
    if args.device == "cpu":
        from benchmarks.cpu_modes import cpu_model

        env["cpu"] = cpu_model()
    record = {"environment": env, "preset": args.preset, "backend": engine.kernels.name,
              "kernels": engine.kernels.choice, "dtype": str(engine.model.dtype), "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "runs": args.runs, "max_batch": engine.max_batch, "rows": rows}
    where = harness.slug(harness.device_name(env).split(" (")[0])
    out = args.out or harness.RESULTS_DIR / f"{where}-{args.preset}-batching-{_dt.date.today().isoformat()}"
    text = harness.write_results(out, record, f"Continuous batching: preset `{args.preset}`, {record['dtype']}, "
                                 f"backend {record['backend']}, {args.prompt_len}-token prompts, {args.new_tokens} new "
                                 f"tokens per request, median of {args.runs} runs", harness.device_name(env), rows,
                                 COLUMNS)
    print(text)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
