"""Every registered op, every case of the geometry (7B: R = 1, 11, 14), every implementation.

Per case: each implementation in the op's `impls` that can run here (triton, cuda when the
extension is built, flash when installed), the torch eager reference, and torch.compile of the
reference (default mode), all timed as CUDA-graph replays with the L2 flushed before each.
Reported: median µs, GB/s (`Case.bytes_moved` / time), % of the measured copy bandwidth, the
floor (bytes / copy bandwidth) and the speed-up over the torch reference.

    python -m benchmarks.bench_ops [--write-auto-choice [PATH]]

`--write-auto-choice` writes, per op, the fastest implementation the runtime can select
("torch", or a key of the op's impls; summed over the op's cases) to
vita_kernels/auto_choice.json as {"device_name": ..., "choice": {op: impl}}.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from benchmarks import harness

AUTO_CHOICE_PATH = harness.REPO / "vita_kernels" / "auto_choice.json"
COMPILED = "torch.compile"
COLUMNS: list[harness.Column] = [
    ("op", "op", ""), ("case", "case", ""), ("impl", "impl", ""),
    ("median µs", "us", ".1f"), ("p20-p80 µs", "spread", ""), ("GB/s", "gbps", ".0f"),
    ("% copy BW", "pct_copy_bw", ".1f"), ("floor µs", "floor_us", ".1f"),
    ("x vs torch", "vs_torch", ".2f"), ("graph", "graphed", ""), ("note", "note", ""),
]


def candidates(spec, settings: harness.Settings, notes: list[str]) -> dict[str, Callable]:
    """The torch reference first (the ratio's baseline), its compiled form, then the op's impls."""
    from vita_kernels.backend import triton_runs_on

    dev = settings.torch_device
    impls: dict[str, Callable] = {"torch": spec.ref}
    if settings.compile:
        if settings.time_left() > 90:
            torch._dynamo.reset()  # a fresh cache per op; automatic dynamic shapes: 1-3 compilations per op
            impls[COMPILED] = torch.compile(spec.ref)
        else:
            notes.append(f"{spec.name}: {COMPILED} skipped, the time budget is nearly spent")
    for name, fn in spec.impls.items():
        if name == "triton" and not triton_runs_on(dev):
            notes.append(f"{spec.name}: triton skipped, it needs a CUDA device or TRITON_INTERPRET=1 on the CPU")
        elif name in ("cuda", "flash") and dev.type != "cuda":
            notes.append(f"{spec.name}: {name} skipped, it needs a CUDA device")
        else:
            impls[name] = fn
    return impls


def run(settings: harness.Settings, copy_gbps: float, args: argparse.Namespace | None = None) -> dict:
    from vita_kernels.registry import GEOMETRIES, ops

    geom = GEOMETRIES[settings.geometry]
    rows: list[dict] = []
    notes: list[str] = []
    start = time.perf_counter()
    for spec in ops():
        if settings.time_left() < 20:
            notes.append(f"{spec.name} and the ops after it skipped: the time budget is spent")
            break
        impls = candidates(spec, settings, notes)
        gen = torch.Generator().manual_seed(settings.seed)
        cases = spec.cases(geom, settings.torch_dtype, settings.torch_device, gen)
        for case in cases:
            torch_us = None
            for impl, fn in impls.items():
                row = {"op": spec.name, "case": case.name, "impl": impl, "bytes_moved": case.bytes_moved or None}
                try:
                    t = harness.time_fn(partial(fn, **case.kwargs), settings, graph=True)
                except Exception as exc:  # noqa: BLE001 - one failing impl must not stop the suite
                    harness.sync(settings.device)
                    row.update(us=None, note=f"error: {harness._first_line(exc)}")
                    rows.append(row)
                    continue
                if impl == "torch":
                    torch_us = t.median_us
                row.update(us=t.median_us, p20_us=t.p20_us, p80_us=t.p80_us, graphed=t.graphed, note=t.note,
                           spread=f"{t.p20_us:.1f}-{t.p80_us:.1f}",
                           vs_torch=torch_us / t.median_us if torch_us else None,
                           **harness.roofline(case.bytes_moved, t.median_us, copy_gbps))
                rows.append(row)
        del cases
        harness.free_memory()
    section = {"geometry": settings.geometry, "dtype": settings.dtype, "rows": rows, "notes": notes,
               "fastest": fastest(rows), "elapsed_s": time.perf_counter() - start}
    target = getattr(args, "write_auto_choice", None) if args is not None else None
    if target and settings.smoke and Path(target).resolve() == AUTO_CHOICE_PATH:
        notes.append("smoke run: the auto choice is not written to the package (it measures nothing)")
    elif target:
        section["auto_choice_path"] = str(write_auto_choice(section["fastest"], target, settings))
    return section


def fastest(rows: list[dict]) -> dict[str, str]:
    """Per op, the selectable implementation (not torch.compile) with the least total time over
    its cases; an implementation that failed or skipped any case is not eligible."""
    by_op: dict[str, dict[str, list]] = {}
    for r in rows:
        if r["impl"] != COMPILED:
            by_op.setdefault(r["op"], {}).setdefault(r["impl"], []).append(r["us"])
    choice = {}
    for op, impls in by_op.items():
        counts = max(len(v) for v in impls.values())
        totals = {i: sum(v) for i, v in impls.items() if len(v) == counts and None not in v}
        if totals:
            choice[op] = min(totals, key=totals.get)
    return choice


def write_auto_choice(choice: dict[str, str], path: str | Path, settings: harness.Settings) -> Path:
    """The resolver's input: {"device_name": ..., "choice": {op: impl}} for the device measured."""
    path = Path(path)
    name = (torch.cuda.get_device_properties(settings.torch_device).name if settings.torch_device.type == "cuda"
            else "cpu")
    return harness.write_json(path, {"device_name": name, "choice": choice})


def render(section: dict) -> str:
    text = [f"### Ops ({section['geometry']} geometry, {section['dtype']})", "",
            harness.markdown_table(section["rows"], COLUMNS), ""]
    text += ["Fastest selectable implementation per op: "
             + ", ".join(f"{op} = {impl}" for op, impl in section["fastest"].items()), ""]
    text += [f"- {n}" for n in section["notes"]]
    return "\n".join(text).rstrip() + "\n"


def chart_panels(section: dict) -> list[dict]:
    panels = []
    for op in dict.fromkeys(r["op"] for r in section["rows"]):
        rows = [r for r in section["rows"] if r["op"] == op]
        labels = list(dict.fromkeys(r["case"] for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        lookup = {(r["case"], r["impl"]): r for r in rows}
        floors = {r["case"]: r.get("floor_us") for r in rows if r.get("floor_us")}
        panels.append({"title": op, "labels": labels,
                       "series": {i: [lookup.get((c, i), {}).get("us") for c in labels] for i in impls},
                       "floor_us": [floors.get(c) for c in labels]})
    return panels


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--write-auto-choice", nargs="?", const=str(AUTO_CHOICE_PATH), default=None, metavar="PATH",
                        help=f"write the fastest implementation per op (default path {AUTO_CHOICE_PATH})")


def main(argv: list[str] | None = None) -> int:
    return harness.standalone("bench_ops", run, render, argv, add_args)


if __name__ == "__main__":
    raise SystemExit(main())
