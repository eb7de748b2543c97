"""The one-minute GPU smoke benchmark: achieved GB/s of every op's Triton kernel at the 7B
shapes, and the time of one MCTP step, against a copy bandwidth measured in the same process.

    python -m benchmarks.smoke [--device cuda:N] [--json PATH]
    python -m benchmarks.smoke --cpu-dry-run [--json PATH]   # the same code on a CPU; NOT a measurement

On a GPU (bf16, batch 1):
- copy bandwidth: `harness.copy_bandwidth`, a 1 GiB device-to-device copy (bytes read + written);
- ops: every registered op's Triton implementation on the registry's 7B cases with R = 1 and
  R = 11 rows (the head's cases have R = 1 only: it runs on the last row), each timed by
  `harness.time_fn` (triton.testing.do_bench, the L2 flushed before every call, CUDA-graph
  replays, median); GB/s = `Case.bytes_moved` / median time;
- MCTP step: one module (mtp_input, one decoder layer, the full-vocabulary head's argmax) over
  R = 11 rows, as the runtime runs it: an engine with the 7B geometry but one LLM layer and one
  MCTP module (3.4 GB instead of 20 GB: nothing else is timed), its runner's own captured CUDA
  graph replayed; its floor is the module's weight bytes (1.72 GB) / the copy bandwidth.
Prints a markdown table and the JSON record (or writes it to --json). Sized for under a
minute on an H100/H200, Triton compilation included (not yet timed on one); --time-budget-s
stops starting new op timings once spent (the MCTP step still runs).

Without a CUDA device it exits with status 2 and says so, unless --cpu-dry-run: then the same
code runs at the tiny geometry through the Triton interpreter in bf16, with one untimed and two
timed calls per region (the harness's fewest), to prove the plumbing; those numbers are not a
measurement and are labelled so.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks import harness

ROWS = (1, 11)  # decode, and Turbo's steady-state catch-up
STEP_ROWS = 11
OP_COLUMNS: list[harness.Column] = [
    ("op", "op", ""), ("case", "case", ""), ("R", "rows", "d"), ("median µs", "us", ".1f"),
    ("p20-p80 µs", "spread", ""), ("GB/s", "gbps", ".0f"), ("% copy BW", "pct_copy_bw", ".1f"),
    ("floor µs", "floor_us", ".1f"), ("graph", "graphed", ""), ("note", "note", ""),
]
STEP_COLUMNS: list[harness.Column] = [
    ("region", "region", ""), ("R", "rows", "d"), ("median µs", "us", ".1f"), ("p20-p80 µs", "spread", ""),
    ("weight bytes", "bytes_text", ""), ("floor µs", "floor_us", ".1f"), ("% of floor", "pct_copy_bw", ".1f"),
    ("GB/s", "gbps", ".0f"), ("note", "note", ""),
]


def settings_for(device: str | None, dry_run: bool, budget_s: float | None) -> harness.Settings:
    if dry_run:
        s = harness.Settings.smoke_settings("cpu")
        s = dataclasses.replace(s, dtype="bf16", warmup_ms=0.0, rep_ms=0.0, host_min_calls=2, prompt_len=8,
                                max_seq_len=64)
    else:
        s = harness.Settings(device=device or "cuda", geometry="7b", preset="7b", dtype="bf16", compile=False)
        s.quicken()  # 10 ms warm-up, 40 ms of timed calls per region
    s.backend = "triton"  # what is timed, recorded as such
    if budget_s is not None:
        s.deadline = time.monotonic() + budget_s
    return s


def case_rows(case_name: str) -> int | None:
    """R of a registry case from its name ("o_proj-R11-3584x3584" -> 11), None when it has none."""
    match = re.search(r"(?:^|-)R(\d+)(?:-|$)", case_name)
    return int(match.group(1)) if match else None


def time_ops(settings: harness.Settings, copy_gbps: float) -> tuple[list[dict], list[str]]:
    """Every op's Triton implementation on its cases with R in ROWS."""
    from vita_kernels.registry import GEOMETRIES, ops

    geom = GEOMETRIES[settings.geometry]
    rows: list[dict] = []
    notes: list[str] = []
    for spec in ops():
        impl = spec.impls.get("triton")
        if impl is None:
            notes.append(f"{spec.name}: no Triton implementation registered")
            continue
        if settings.time_left() < 0:
            notes.append(f"{spec.name}: skipped, the time budget is spent")
            continue
        gen = torch.Generator().manual_seed(settings.seed)
        cases = [c for c in spec.cases(geom, settings.torch_dtype, settings.torch_device, gen)
                 if case_rows(c.name) in ROWS]
        if not cases:
            notes.append(f"{spec.name}: no case with R in {ROWS} at the {geom.name} geometry")
        for case in cases:
            row = {"op": spec.name, "case": case.name, "rows": case_rows(case.name), "impl": "triton",
                   "bytes_moved": case.bytes_moved or None}
            try:
                t = harness.time_fn(partial(impl, **case.kwargs), settings, graph=True)
            except Exception as exc:  # noqa: BLE001 - one failing kernel must not hide the others
                harness.sync(settings.device)
                row.update(us=None, note=f"error: {harness._first_line(exc)}")
            else:
                row.update(us=t.median_us, p20_us=t.p20_us, p80_us=t.p80_us, spread=f"{t.p20_us:.1f}-{t.p80_us:.1f}",
                           graphed=t.graphed, note=t.note, **harness.roofline(case.bytes_moved, t.median_us, copy_gbps))
            rows.append(row)
        del cases
        harness.free_memory()
    return rows, notes


def step_engine(settings: harness.Settings):
    """An engine of the preset's geometry with one LLM layer and one MCTP module: exactly the
    weights one MCTP step reads, plus a one-layer LLM to fill the state behind it."""
    from vita_audio_runtime.checkpoint import random_tensors
    from vita_audio_runtime.config import PRESETS
    from vita_audio_runtime.engine import Engine

    preset = PRESETS[settings.preset]  # one slot: the state of a single stream
    cfg = dataclasses.replace(preset.config, num_llm_layers=1, num_mtp_modules=1)
    tensors = random_tensors(cfg, settings.torch_dtype, settings.torch_device, seed=settings.seed)
    return Engine(cfg, tensors, preset.special_tokens(), preset.defaults, backend="triton",
                  max_seq_len=settings.max_seq_len, max_batch=1)


def time_mctp_step(settings: harness.Settings, copy_gbps: float) -> dict:
    """Module 0 over STEP_ROWS rows, the runner's graph replayed (eager on a CPU)."""
    from benchmarks.bench_mctp_step import weight_floors
    from vita_audio_runtime.scheduler import Span

    engine = step_engine(settings)
    runner = engine.runner
    params = [engine.sampling_params(do_sample=False, repetition_penalty=1.0)]  # greedy: the fused head argmax
    prompt = harness.prompt_ids(engine, settings.prompt_len, settings.seed)
    first = len(prompt)
    # Real activations behind every row the step reads: the KV cache, the hidden history and the
    # token buffer are filled past first + STEP_ROWS + 1 by a generation.
    engine.generate(prompt, mode="turbo", max_new_tokens=STEP_ROWS + 2, do_sample=False, ignore_eos=True)
    floor_bytes = weight_floors(engine.model)["mctp_step"]
    row = {"region": "mctp_step", "rows": STEP_ROWS, "impl": "triton", "bytes_moved": floor_bytes,
           "bytes_text": harness.size_text(floor_bytes), "backend": engine.kernels.choice}
    try:
        t = harness.time_fn(lambda: runner.mtp_step(0, [Span(0, first, STEP_ROWS, emit=True)], params), settings)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        harness.sync(settings.device)
        row.update(us=None, note=f"error: {harness._first_line(exc)}")
        return row
    graphed = any(key[:2] == ("mtp", 0) for key in runner.graphs)
    row.update(us=t.median_us, p20_us=t.p20_us, p80_us=t.p80_us, spread=f"{t.p20_us:.1f}-{t.p80_us:.1f}",
               graphed=graphed, note="; ".join(filter(None, ["runner graph replay" if graphed else "eager", t.note])),
               **harness.roofline(floor_bytes, t.median_us, copy_gbps))
    return row


def run(settings: harness.Settings, dry_run: bool) -> dict:
    start = time.perf_counter()
    env = harness.environment(settings)
    copy = harness.copy_bandwidth(settings)
    ops_rows, notes = time_ops(settings, copy["gbps"])
    step = time_mctp_step(settings, copy["gbps"])
    harness.free_memory()  # the step's engine
    return {"kind": "smoke", "dry_run": dry_run, "measurement": not dry_run, "environment": env,
            "settings": settings.record(), "rows_timed": list(ROWS), "copy_bandwidth": copy, "ops": ops_rows,
            "mctp_step": step, "notes": notes, "elapsed_s": time.perf_counter() - start}


def render(record: dict) -> str:
    env = record["environment"]
    lines = []
    if record["dry_run"]:
        lines += [harness.SMOKE_BANNER, ""]
    s = record["settings"]
    lines += [f"## Smoke: {harness.device_name(env)}, {s['geometry']} shapes, {s['dtype']}, batch 1",
              "",
              (f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, commit {env['git_commit']}"
               f"{' (dirty)' if env['git_dirty'] else ''}, {env['date_utc']}"),
              "",
              f"Copy bandwidth (device to device, read + written): {record['copy_bandwidth']['gbps']:.0f} GB/s",
              "",
              f"### Ops (Triton, R in {tuple(record['rows_timed'])})", "",
              harness.markdown_table(record["ops"], OP_COLUMNS), "",
              f"### MCTP step (module 0, R = {record['mctp_step']['rows']})", "",
              harness.markdown_table([record["mctp_step"]], STEP_COLUMNS), ""]
    lines += [f"- {n}" for n in record["notes"]]
    lines.append(f"\n{record['elapsed_s']:.1f} s in all")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cuda:N (default cuda)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="no GPU: run the same code at the tiny geometry through the Triton interpreter "
                             "(proves the plumbing; measures nothing)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the JSON record here (default: print it)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="stop starting op timings after this long (the MCTP step still runs)")
    args = parser.parse_args(argv)
    if args.cpu_dry_run:
        if args.device not in (None, "cpu"):
            parser.error(f"--cpu-dry-run runs on the CPU; got --device {args.device}")
    else:
        if not torch.cuda.is_available():
            print("benchmarks.smoke measures a GPU, and no CUDA device is available here. Run it on a GPU, "
                  "or pass --cpu-dry-run to check the plumbing on the CPU (not a measurement).", file=sys.stderr)
            return 2
        if args.device is not None and not args.device.startswith("cuda"):
            parser.error(f"--device {args.device}: the smoke benchmark measures a CUDA device")
    settings = settings_for(args.device, args.cpu_dry_run, args.time_budget_s)
    harness.prepare_interpreter(settings)  # before anything imports a Triton kernel
    record = run(settings, args.cpu_dry_run)
    print(render(record))
    if args.json:
        harness.write_json(Path(args.json), record)
        print(f"JSON: {args.json}")
    else:
        print(json.dumps(record, indent=1, default=str))
    failed = [r for r in record["ops"] + [record["mctp_step"]] if r.get("us") is None]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
