"""The whole suite in one run: end to end, the MCTP step, every op; tables, targets and files.

    python -m benchmarks.run_all [--out DIR] [--quick] [--skip ops,mctp,e2e] [--device cuda]
    python -m benchmarks.run_all --smoke [--out DIR]      # CPU plumbing check, not a measurement
    python -m benchmarks.run_all --render DIR             # re-write results.md and the charts
    vita-audio bench [same arguments]

Writes into DIR (default benchmarks/results/<gpu-slug>-<date>/): results.json (environment,
settings, copy bandwidth, every row, targets), results.md (the printed tables) and the charts
ops.png and mctp_step.png. The JSON and markdown are rewritten after each section, so a run
cut short keeps what it measured. Sections run in the order that protects the targets first:
end to end (three of the four), the MCTP step (sharing the engine; its torch.compile peers
last, skipped when --time-budget-s runs short), then the per-op tables, the longest.
Smoke output always goes to a temporary directory, never under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks import harness

SECTIONS = ("e2e", "mctp", "ops")

# The targets: H100, 7B, bf16, batch 1, exact full head.
TARGETS = [
    ("one MCTP step (R = 1, graph)", "ms", "<=", 0.65),
    ("Boost first audio chunk (first 1 + N tokens, 32-token prompt)", "ms", "<=", 13.0),
    ("Turbo tokens/s over Vanilla", "x", ">=", 4.5),
    ("Vanilla decode, % of its bandwidth floor (LLM bytes / copy BW)", "%", ">=", 85.0),
]
TARGET_COLUMNS: list[harness.Column] = [
    ("target", "name", ""), ("measured", "measured_text", ""), ("target", "target_text", ""),
    ("met", "met", lambda v: v if isinstance(v, str) else ("yes" if v else "NO")), ("note", "note", ""),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(parser)
    parser.add_argument("--out", default=None, help="output directory (default benchmarks/results/<gpu>-<date>/)")
    parser.add_argument("--skip", default="", help=f"comma-separated sections to skip: {', '.join(SECTIONS)}")
    parser.add_argument("--render", metavar="DIR", default=None,
                        help="re-write results.md and the charts from DIR/results.json (no device needed)")
    parser.add_argument("--write-auto-choice", nargs="?", const="", default=None, metavar="PATH",
                        help="write the fastest implementation per op (default vita_kernels/auto_choice.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.render:
            return render_dir(Path(args.render))
        skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        if skip - set(SECTIONS):
            raise SystemExit(f"--skip {args.skip!r}: unknown section(s) {sorted(skip - set(SECTIONS))}; "
                             f"expected some of {', '.join(SECTIONS)}")
        settings = harness.settings_from_args(args)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(f"error: {exc.code}", file=sys.stderr)
            return 2
        return int(exc.code or 0)
    harness.prepare_interpreter(settings)  # before anything imports a Triton kernel
    try:
        out = output_dir(args.out, settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(settings, out, skip, args)


def output_dir(out: str | None, settings: harness.Settings) -> Path:
    results = harness.RESULTS_DIR.resolve()
    if settings.smoke:
        if out is None:
            return Path(tempfile.mkdtemp(prefix="vita-bench-smoke-"))
        path = Path(out).resolve()
        if path == results or results in path.parents:
            raise ValueError(f"--out {out}: smoke output is not a measurement and never goes under {results}")
        return path
    if out is not None:
        return Path(out)
    import torch

    name = torch.cuda.get_device_properties(settings.torch_device).name
    base = results / f"{harness.slug(name)}-{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}"
    path, i = base, 2
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


def run(settings: harness.Settings, out: Path, skip: set[str], args: argparse.Namespace) -> int:
    from benchmarks import bench_e2e, bench_mctp_step, bench_ops

    out.mkdir(parents=True, exist_ok=True)
    if settings.smoke:
        print(harness.SMOKE_BANNER)
    results: dict = {"suite": "vita-audio benchmarks", "smoke": settings.smoke, "measurement": not settings.smoke,
                     "environment": harness.environment(settings), "settings": settings.record(),
                     "copy_bandwidth": {}, "sections": {}, "errors": {}, "targets": []}
    print(environment_text(results))
    copy = harness.copy_bandwidth(settings)
    results["copy_bandwidth"] = {"start": copy, "gbps": copy["gbps"]}
    print(f"measured copy bandwidth: {copy['gbps']:.0f} GB/s (bytes read + written, median)\n")
    if args.write_auto_choice == "":
        args.write_auto_choice = str(bench_ops.AUTO_CHOICE_PATH)
    engine = None
    if {"mctp", "e2e"} - skip:
        engine, load_s = harness.load_engine(settings)
        results["engine"] = {"preset": settings.preset, "load_s": load_s, "backend": engine.kernels.choice}
    runners = {"mctp": lambda: bench_mctp_step.run(settings, copy["gbps"], args, engine=engine),
               "e2e": lambda: bench_e2e.run(settings, copy["gbps"], args, engine=engine),
               "ops": lambda: bench_ops.run(settings, copy["gbps"], args)}
    renderers = {"mctp": bench_mctp_step.render, "e2e": bench_e2e.render, "ops": bench_ops.render}
    for name in SECTIONS:
        if name in skip:
            continue
        if name == "ops" and engine is not None:
            del engine, runners["mctp"], runners["e2e"]  # 7B weights out of the way of the op cases
            engine = None
            harness.free_memory()
        start = time.perf_counter()
        try:
            results["sections"][name] = runners[name]()
            print(renderers[name](results["sections"][name]))
        except Exception:  # noqa: BLE001 - a failing section is reported; the others still run
            results["errors"][name] = traceback.format_exc()
            print(f"section {name} failed after {time.perf_counter() - start:.0f} s:\n{results['errors'][name]}",
                  file=sys.stderr)
            harness.sync(settings.device)
        results["targets"] = targets(results, settings)
        write_outputs(results, out, charts=False)
    end = harness.copy_bandwidth(settings)
    results["copy_bandwidth"]["end"] = end
    results["copy_bandwidth"]["drift_pct"] = 100.0 * (end["gbps"] - copy["gbps"]) / copy["gbps"]
    results["settings"]["time_budget_left_s"] = settings.record()["time_budget_left_s"]
    results["targets"] = targets(results, settings)
    write_outputs(results, out, charts=True)
    print(targets_text(results))
    if settings.smoke:
        print(harness.SMOKE_BANNER)
    print(f"wrote {out}/results.json, results.md" + "".join(f", {p}" for p in results.get("charts", {}).values() if p))
    return 1 if results["errors"] else 0


# -- targets ----------------------------------------------------------------------------------
def targets(results: dict, settings: harness.Settings) -> list[dict]:
    from benchmarks import bench_e2e, bench_mctp_step

    mctp = results["sections"].get("mctp", {})
    e2e = results["sections"].get("e2e", {})
    step = bench_mctp_step.step_us(mctp) if mctp else None
    boost, turbo, vanilla = (bench_e2e.result(e2e, m) if e2e else None for m in ("boost", "turbo", "vanilla"))
    measured = [
        None if step is None else step / 1e3,
        boost and boost["first_chunk_ms"],
        turbo and vanilla and turbo["tokens_per_s"] / vanilla["tokens_per_s"],
        vanilla and vanilla.get("pct_of_floor"),
    ]
    gpu = results["environment"].get("gpu") or {}
    rows = []
    for (name, unit, op, goal), value in zip(TARGETS, measured):
        note = ""
        if settings.smoke:
            met, note = "n/a (smoke)", "not a measurement"
        elif value is None:
            met, note = "n/a", "not measured in this run"
        elif (settings.preset, settings.dtype) != ("7b", "bf16"):
            met, note = "n/a", f"targets are for 7B bf16, measured {settings.preset} {settings.dtype}"
        else:
            met = value <= goal if op == "<=" else value >= goal
            if "H100" not in gpu.get("name", ""):
                note = f"targets are stated for H100; measured on {gpu.get('name')}"
        if name.startswith(("Boost", "Turbo", "Vanilla")) and vanilla and vanilla["loop"] != "graph":
            note = "; ".join(filter(None, [note, "eager loop (no CUDA graphs here)"]))
        rows.append({"name": name, "measured": value, "unit": unit, "op": op, "target": goal, "met": met,
                     "note": note, "measured_text": harness.fmt(value, ".3f" if unit == "ms" else ".2f")
                     + ("" if value is None else f" {unit}"), "target_text": f"{op} {goal:g} {unit}"})
    return rows


# -- output -----------------------------------------------------------------------------------
def environment_text(results: dict) -> str:
    env = results["environment"]
    gpu = env.get("gpu") or {}
    commit = env.get("git_commit") or "unknown (no git repository)"
    dirty = " (dirty working tree)" if env.get("git_dirty") else ""
    return "\n".join([
        f"device: {harness.device_name(env)}" + (f", driver {gpu.get('driver')}, {gpu.get('sm_count')} SMs, "
                                                 f"L2 {gpu.get('l2_bytes')} B" if gpu else ""),
        f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, transformers {env['transformers']}, "
        f"flash-attn {env['flash_attn']}, CUDA extension built: {env['cuda_extension_built']}",
        f"commit {commit}{dirty}, {env['date_utc']}, python {env['python']}", ""])


def targets_text(results: dict) -> str:
    return "\n".join(["### Targets (H100, 7B, bf16, batch 1, exact full head)", "",
                      harness.markdown_table(results["targets"], TARGET_COLUMNS), ""])


def markdown(results: dict) -> str:
    from benchmarks import bench_e2e, bench_mctp_step, bench_ops

    smoke = results["smoke"]
    title = "# vita-audio benchmarks" + (" (SMOKE: not a measurement)" if smoke else "")
    copy = results["copy_bandwidth"]
    parts = [title, ""]
    if smoke:
        parts += [f"**{harness.SMOKE_BANNER}**", ""]
    parts += [environment_text(results).replace("\n", "  \n"), ""]
    if copy:
        line = f"Measured copy bandwidth: {copy['gbps']:.0f} GB/s (1 GiB device-to-device copy, bytes read + written)"
        if "end" in copy:
            line += f"; {copy['end']['gbps']:.0f} GB/s at the end of the run ({copy['drift_pct']:+.1f}%)"
        parts += [line + ".", ""]
    parts += [targets_text(results)]
    renderers = {"mctp": bench_mctp_step.render, "e2e": bench_e2e.render, "ops": bench_ops.render}
    for name, section in results["sections"].items():
        parts += [renderers[name](section)]
    for name, text in results["errors"].items():
        parts += [f"### Section {name} failed", "", "```", text.rstrip(), "```", ""]
    return "\n".join(parts)


def write_outputs(results: dict, out: Path, charts: bool) -> None:
    from benchmarks import bench_mctp_step, bench_ops

    if charts:
        made, why = {}, {}
        suffix = " (SMOKE: not a measurement)" if results["smoke"] else ""
        device = harness.device_name(results["environment"])
        for name, module, file in (("ops", bench_ops, "ops.png"), ("mctp", bench_mctp_step, "mctp_step.png")):
            if name in results["sections"]:
                path, reason = harness.plot_against_floor(module.chart_panels(results["sections"][name]), out / file,
                                                          f"{name}: median time against the floor on {device}{suffix}")
                made[name], why[name] = (path.name if path else None), reason
        results["charts"] = made
        results["charts_skipped"] = {k: v for k, v in why.items() if v}
    harness.write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown(results))


def render_dir(out: Path) -> int:
    path = out / "results.json"
    if not path.exists():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    results = json.loads(path.read_text())
    write_outputs(results, out, charts=True)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
