"""Load on the HTTP server over loopback: requests/s, time to the first audio chunk and aggregate
tokens/s at each client concurrency (1, 2, 4, 8 by default).

Each level runs `--requests-per-client` x concurrency streaming requests (SSE, random text-id
prompts, EOS ignored so every request makes `--new-tokens` tokens) from that many client
threads, and reports, measured at the client: requests/s and tokens/s over the level's wall time,
time to the first event and to the first complete audio chunk (p50/p95), and 503s. The server
runs in this process on 127.0.0.1 (a free port) around the engine it builds, or is an
already running one given by `--url` (loopback only). Everything is bounded: a timeout per
request and `--time-budget-s` for the run (levels not started in time are skipped and listed).
Random-weight presets rarely emit audio segments, so their audio columns read n/a: use a real
checkpoint for those. Writes results.json and results.md (--out).

    python -m benchmarks.bench_server --model 7b --device cuda --dtype bf16 --mode boost
    python -m benchmarks.bench_server --url http://127.0.0.1:8000 --concurrency 1 4
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import json
import random
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from benchmarks import harness

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
COLUMNS: list[harness.Column] = [
    ("clients", "concurrency", ""), ("requests", "completed", ""), ("503s", "rejected", ""),
    ("errors", "errors", ""), ("requests/s", "requests_per_s", ".2f"),
    ("tokens/s (all clients)", "tokens_per_s", ".1f"),
    ("first event p50 ms", "ttfe_p50_ms", ".1f"), ("first event p95 ms", "ttfe_p95_ms", ".1f"),
    ("audio TTFP p50 ms", "audio_ttfp_p50_ms", ".1f"), ("audio TTFP p95 ms", "audio_ttfp_p95_ms", ".1f"),
    ("requests with audio", "with_audio", ""),
]


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def one_request(client, url: str, body: dict) -> dict:
    """One SSE request, timed at the client: first event, first complete audio chunk, tokens."""
    start = time.perf_counter()
    out = {"status": None, "ttfe_s": None, "audio_ttfp_s": None, "tokens": 0, "error": None}
    try:
        with client.stream("POST", f"{url}/v1/generate", json={**body, "stream": True}) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                r.read()
                return out
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[len("event: "):]
                    continue
                if not line.startswith("data: "):
                    continue
                now = time.perf_counter() - start
                data = json.loads(line[len("data: "):])
                out["ttfe_s"] = now if out["ttfe_s"] is None else out["ttfe_s"]
                if event == "audio" and data.get("complete") and out["audio_ttfp_s"] is None:
                    out["audio_ttfp_s"] = now
                elif event == "done":
                    out["tokens"] = len(data["tokens"])
                elif event == "error":
                    out["error"] = data.get("message")
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def run_level(url: str, concurrency: int, count: int, body_for, timeout_s: float) -> dict:
    import httpx

    start = time.perf_counter()
    with httpx.Client(timeout=timeout_s) as client, concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: one_request(client, url, body_for(i)), range(count)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200 and r["error"] is None]
    ttfe = [r["ttfe_s"] * 1e3 for r in ok if r["ttfe_s"] is not None]
    ttfp = [r["audio_ttfp_s"] * 1e3 for r in ok if r["audio_ttfp_s"] is not None]
    return {
        "concurrency": concurrency, "requests": count, "completed": len(ok),
        "rejected": sum(r["status"] == 503 for r in results),
        "errors": sum(r["status"] not in (200, 503) or r["error"] is not None for r in results),
        "first_error": next((r["error"] or f"HTTP {r['status']}" for r in results
                             if r["status"] not in (200, 503) or r["error"]), None),
        "wall_s": wall, "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "ttfe_p50_ms": percentile(ttfe, 0.5), "ttfe_p95_ms": percentile(ttfe, 0.95),
        "audio_ttfp_p50_ms": percentile(ttfp, 0.5), "audio_ttfp_p95_ms": percentile(ttfp, 0.95),
        "with_audio": len(ttfp),
    }


def start_server(args):
    """The engine and server in this process on a free loopback port; returns (url, stop)."""
    from vita_audio_runtime.engine import Engine
    from vita_audio_runtime.server import build_server
    from vita_audio_runtime.tokenizer import TextTokenizer, TokenizerMissingError

    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                                    max_seq_len=args.max_seq_len, max_batch=args.max_batch, max_queue=args.max_queue)
    try:
        tokenizer = TextTokenizer.from_pretrained(args.model)
    except TokenizerMissingError:
        tokenizer = None  # the benchmark sends ids
    server = build_server(engine, tokenizer, host="127.0.0.1", port=0, model_name=args.model, log_level="warning")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.01)

    def stop() -> None:
        server.request_stop()
        thread.join(60)
        sock.close()
        engine.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def render(r: dict) -> str:
    s = r["settings"]
    lines = [f"# Server load: {s['model']} ({s['mode'] or 'default mode'})", "",
             f"{r['environment']['date_utc']}, commit {r['environment']['git_commit']}, "
             f"{r['environment']['platform']}, torch {r['environment']['torch']}; "
             f"backend {s['backend']}, max_batch {s['max_batch']}, prompt {s['prompt_len']} ids, "
             f"{s['new_tokens']} new tokens per request, {s['requests_per_client']} requests per client, "
             "over loopback.",
             "", harness.markdown_table(r["levels"], COLUMNS), ""]
    if r["skipped"]:
        lines.append(f"Skipped (time budget): concurrency {', '.join(map(str, r['skipped']))}.")
    if not any(level["with_audio"] for level in r["levels"]):
        lines.append("No request produced a complete audio chunk (random weights rarely do): audio TTFP is n/a.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server on this machine (loopback only); default: start one here")
    p.add_argument("--model", default="7b", help="preset or checkpoint directory for the in-process server")
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--backend", default="auto")
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--mode", help="vanilla | balance | boost | turbo (default: the model's)")
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--time-budget-s", type=float, default=600.0, help="no level starts after this")
    p.add_argument("--out", type=Path, help="results directory (default benchmarks/results/server-<model>-<date>)")
    args = p.parse_args(argv)
    if any(c < 1 for c in args.concurrency) or args.requests_per_client < 1:
        p.error("--concurrency values and --requests-per-client must be >= 1")
    deadline = time.monotonic() + args.time_budget_s
    stop = None
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            p.error(f"--url {args.url}: this benchmark only talks to a server on this machine (127.0.0.1)")
        url = args.url.rstrip("/")
    else:
        url, stop = start_server(args)
    try:
        import httpx

        info = httpx.get(f"{url}/v1/model", timeout=30).json()
        n_text = min(info["special"]["eos_ids"]) if info["special"]["eos_ids"] else info["config"]["vocab_size"]

        def body_for(i: int) -> dict:
            rng = random.Random(i)
            body = {"prompt_ids": [rng.randrange(n_text) for _ in range(args.prompt_len)],
                    "max_new_tokens": args.new_tokens, "ignore_eos": True}
            return body if args.mode is None else {**body, "mode": args.mode}

        levels, skipped = [], []
        for c in args.concurrency:
            if time.monotonic() > deadline:
                skipped.append(c)
                continue
            levels.append(run_level(url, c, c * args.requests_per_client, body_for, args.request_timeout_s))
            print(harness.markdown_table(levels[-1:], COLUMNS), file=sys.stderr)
    finally:
        if stop is not None:
            stop()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["model"] = info.get("model") or args.model
    settings["max_batch"] = info["max_batch"]
    import torch

    engine_device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = harness.environment(harness.Settings(device="cpu" if args.url else engine_device))
    result = {"benchmark": "server", "settings": settings, "environment": env, "levels": levels, "skipped": skipped,
              "measurement": True}
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or harness.REPO / "benchmarks" / "results" / f"server-{harness.slug(str(args.model))}-{date}"
    harness.write_json(out / "results.json", result)
    (out / "results.md").write_text(render(result))
    print(render(result))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}", file=sys.stderr)
    return 0 if all(level["errors"] == 0 for level in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
