"""The schedule's speed-up measured on a CPU: `vita-audio generate` per mode on a preset.

Each run is its own process running the CLI exactly as a user would (`--json`, greedy by
default of the preset, EOS ignored so every mode makes the same number of tokens); the table
reports the median of `--runs` runs per mode and the speed-up over Vanilla. Writes
results.json and results.md into benchmarks/results/cpu-<preset>-<date>/ (or --out).

    python -m benchmarks.cpu_modes --preset small --runs 3 --new-tokens 256
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks import harness

MODES = ("vanilla", "balance", "boost", "turbo")
COLUMNS: list[harness.Column] = [
    ("mode", "mode", ""), ("tokens/s (median)", "tokens_per_s", ".1f"),
    ("per run", "tokens_per_s_runs", lambda v: ", ".join(f"{x:.1f}" for x in v)),
    ("speed-up over Vanilla", "speedup", ".2f"), ("first 11 tokens ms (median)", "first_chunk_ms", ".1f"),
    ("time to first token ms (median)", "ttft_ms", ".1f"),
]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def one_run(preset: str, mode: str, prompt_len: int, new_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "vita_audio_runtime.cli", "generate", "--model", preset, "--mode", mode,
           "--device", "cpu", "--prompt-len", str(prompt_len), "--max-new-tokens", str(new_tokens),
           "--ignore-eos", "--json"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    runs = {mode: [] for mode in MODES}
    for _ in range(args.runs):  # interleaved, so drifts of the machine hit every mode alike
        for mode in MODES:
            runs[mode].append(one_run(args.preset, mode, args.prompt_len, args.new_tokens))
    rows = []
    for mode in MODES:
        t = [r["timings"] for r in runs[mode]]
        rows.append({"mode": mode, "tokens_per_s": statistics.median(x["tokens_per_s"] for x in t),
                     "tokens_per_s_runs": [x["tokens_per_s"] for x in t],
                     "first_chunk_ms": 1e3 * statistics.median(x["first_chunk_s"] for x in t),
                     "ttft_ms": 1e3 * statistics.median(x["ttft_s"] for x in t)})
    vanilla = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / vanilla

    env = harness.environment(harness.Settings(device="cpu", preset=args.preset, dtype="fp32"))
    env["cpu"] = cpu_model()
    first = runs[MODES[0]][0]
    record = {"environment": env, "preset": args.preset, "backend": first["backend"], "dtype": first["dtype"],
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "runs_per_mode": args.runs,
              "rows": rows}
    out = args.out or harness.RESULTS_DIR / f"cpu-{args.preset}-{_dt.date.today().isoformat()}"
    text = harness.write_results(out, record, f"Modes on a CPU: preset `{args.preset}`, {first['dtype']}, backend "
                                 f"torch, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, median of "
                                 f"{args.runs} runs", env["cpu"], rows, COLUMNS)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
