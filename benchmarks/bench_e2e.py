"""End to end on the preset: the four modes, batch 1, a 32-token prompt, greedy, EOS ignored,
a fixed number of new tokens; the CUDA-graph decode loop against the same loop run eagerly.

Per mode and loop: one warm-up generation (Triton JIT, graph capture of every step shape the
mode uses), then `repeats` measured generations; medians of
- first_chunk_s: time to the first 1 + N tokens (the published "first audio chunk" measure:
  236 ms Vanilla, 53 ms Boost/Turbo at 7B with a 32-token prompt);
- tokens_per_s (all new tokens over the whole generation, prefill included) and
  decode_tokens_per_s (after the first token);
the speed-up over Vanilla, graph over eager, and Vanilla's decode rate against its floor
(LLM weight bytes per token / measured copy bandwidth). Also the engine's memory report, and
whether the eager loop produced the same tokens as the graph loop (it must: same kernels).
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

from benchmarks import harness

MODES = ("vanilla", "balance", "boost", "turbo")
COLUMNS: list[harness.Column] = [
    ("mode", "mode", ""), ("loop", "loop", ""), ("first chunk ms", "first_chunk_ms", ".1f"),
    ("TTFT ms", "ttft_ms", ".1f"), ("tokens/s", "tokens_per_s", ".1f"), ("decode tokens/s", "decode_tokens_per_s", ".1f"),
    ("x vs vanilla", "speedup_vs_vanilla", ".2f"), ("graph / eager", "graph_vs_eager", ".2f"),
    ("% of floor", "pct_of_floor", ".1f"), ("tokens", "tokens", "d"), ("same tokens", "tokens_match_graph", ""),
]


@contextmanager
def eager_loop(engine):
    """The engine with an eager DecodeRunner (cuda_graphs=False) over the same model and weights."""
    from vita_audio_runtime.runner import DecodeRunner

    graph_runner = engine.runner
    engine.runner = DecodeRunner(engine.model, engine.max_seq_len, engine.max_batch, use_graphs=False)
    try:
        yield engine
    finally:
        engine.runner = graph_runner


def _measure(engine, prompt: list[int], mode: str, settings: harness.Settings) -> tuple[dict, list[int]]:
    kw = dict(mode=mode, max_new_tokens=settings.new_tokens, do_sample=False, ignore_eos=True, seed=settings.seed)
    engine.generate(prompt, **kw)  # warm-up: JIT compilation and graph capture of every step shape
    results = [engine.generate(prompt, **kw) for _ in range(settings.repeats)]
    for r in results:
        if len(r.tokens) != settings.new_tokens:
            raise RuntimeError(f"{mode}: generated {len(r.tokens)} tokens, expected {settings.new_tokens}")

    def median(key: str) -> float | None:
        values = [r.timings.get(key) for r in results]
        return None if None in values else statistics.median(values)

    def ms(value: float | None) -> float | None:
        return None if value is None else value * 1e3

    row = {"mode": mode, "tokens": settings.new_tokens, "runs": len(results),
           "first_chunk_ms": ms(median("first_chunk_s")), "ttft_ms": ms(median("ttft_s")),
           "first_audio_chunk_ms": ms(median("first_audio_chunk_s")), "total_s": median("total_s"),
           "tokens_per_s": median("tokens_per_s"), "decode_tokens_per_s": median("decode_tokens_per_s"),
           "llm_steps": results[0].producers.count(-1)}
    return row, results[0].tokens


def run(settings: harness.Settings, copy_gbps: float, args: argparse.Namespace | None = None,
        engine=None) -> dict:
    from benchmarks.bench_mctp_step import weight_floors

    start = time.perf_counter()
    load_s = None
    if engine is None:
        engine, load_s = harness.load_engine(settings)
    prompt = harness.prompt_ids(engine, settings.prompt_len, settings.seed)
    llm_bytes = weight_floors(engine.model)["llm_step"]
    floor_s = llm_bytes / (copy_gbps * 1e9)  # Vanilla: every token reads the LLM's weights once
    loops = (["graph"] if engine.runner.use_graphs else []) + ["eager"]
    rows, tokens = [], {}
    for loop in loops:
        for mode in MODES:
            if loop == "graph":
                row, tokens[(loop, mode)] = _measure(engine, prompt, mode, settings)
            else:
                with eager_loop(engine):
                    row, tokens[(loop, mode)] = _measure(engine, prompt, mode, settings)
            rows.append({"loop": loop, **row})
    memory = engine.memory_report()
    by_key = {(r["loop"], r["mode"]): r for r in rows}
    for r in rows:
        vanilla = by_key[(r["loop"], "vanilla")]
        r["speedup_vs_vanilla"] = r["tokens_per_s"] / vanilla["tokens_per_s"]
        eager = by_key.get(("eager", r["mode"]))
        if r["loop"] == "graph" and eager:
            r["graph_vs_eager"] = r["tokens_per_s"] / eager["tokens_per_s"]
        if ("graph", r["mode"]) in tokens and r["loop"] != "graph":
            r["tokens_match_graph"] = tokens[(r["loop"], r["mode"])] == tokens[("graph", r["mode"])]
        if r["mode"] == "vanilla" and r["decode_tokens_per_s"]:
            r["pct_of_floor"] = 100.0 * floor_s * r["decode_tokens_per_s"]
    return {"preset": settings.preset, "dtype": settings.dtype, "backend": engine.kernels.choice,
            "prompt_len": len(prompt), "new_tokens": settings.new_tokens, "repeats": settings.repeats,
            "vanilla_floor": {"llm_bytes_per_token": llm_bytes, "floor_ms_per_token": floor_s * 1e3},
            "memory_report": memory, "rows": rows, "engine_load_s": load_s,
            "elapsed_s": time.perf_counter() - start}


def result(section: dict, mode: str) -> dict | None:
    """The mode's row of the graph loop, or of the eager loop where there is no graph loop (CPU)."""
    rows = {r["loop"]: r for r in section.get("rows", []) if r["mode"] == mode}
    return rows.get("graph") or rows.get("eager")


def render(section: dict) -> str:
    mem = section["memory_report"]
    floor = section["vanilla_floor"]
    text = [f"### End to end ({section['preset']} preset, {section['dtype']}, batch 1, {section['prompt_len']}-token "
            f"prompt, greedy, {section['new_tokens']} new tokens, EOS ignored, median of {section['repeats']})", "",
            harness.markdown_table(section["rows"], COLUMNS), "",
            f"Vanilla floor: {harness.size_text(floor['llm_bytes_per_token'])} of weights per token = "
            f"{floor['floor_ms_per_token']:.2f} ms at the measured copy bandwidth; % of floor = floor time / "
            "measured time per decode token.",
            "Memory: " + ", ".join(f"{k} {harness.size_text(v)}" for k, v in mem.items()), ""]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    return harness.standalone("bench_e2e", run, render, argv)


if __name__ == "__main__":
    raise SystemExit(main())
