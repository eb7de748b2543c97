"""One MCTP step and one burst of N modules: ours against the peers, in the same process.

A step is module 0 over R rows (R = 1, 11, 14 at 7B: decode, Turbo's and Boost's catch-up):
mtp_input + one decoder layer + the head's greedy argmax on the last row. A burst is modules
0..N-1 in a row, each emitting (what Turbo and Boost run between LLM steps). Also one LLM step
(R = 1), the Vanilla decode step, against its floor.

- ours: `engine.runner.burst` / `llm_step` on the preset in the model dtype, replaying the
  runner's captured CUDA graph (the first call captures it);
- transformers eager: transformers' own Qwen2DecoderLayer, Qwen2RMSNorm, rotary embedding and
  nn.Linear projection/head, built on the device with random weights, called eagerly (the
  stack behind the published 2.4 ms per module); its KV cache holds the same number of past
  positions as ours and does not grow between timed calls;
- torch.compile: our torch reference path (the same VitaModel over the `torch` backend),
  compiled with mode=max-autotune (by default) and called as compiled.

Floors are the weight bytes a step must read (spec section 5: 1.72 GB per MCTP step, 14.3 GB
per LLM step at 7B) over the measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from benchmarks import harness
from vita_audio_runtime.scheduler import Span

OURS, HF, COMPILED = "ours (graph)", "transformers eager", "torch.compile"
COLUMNS: list[harness.Column] = [
    ("region", "region", ""), ("R", "rows", "d"), ("impl", "impl", ""), ("median µs", "us", ".1f"),
    ("p20-p80 µs", "spread", ""), ("floor µs", "floor_us", ".1f"), ("% of floor", "pct_copy_bw", ".1f"),
    ("GB/s", "gbps", ".0f"), ("peer / ours", "vs_ours", ".2f"), ("note", "note", ""),
]


class FixedPast:
    """A KV cache of `past` positions that never grows: update() returns past + new, as
    DynamicCache.update computes it (one concatenation), without storing the new rows, so every
    timed call attends over the same length. Duck-types transformers' Cache.update."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def update(self, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.k, k], dim=-2), torch.cat([self.v, v], dim=-2)


class HFModules:
    """N MCTP modules from transformers' Qwen2 building blocks, random weights, on the device."""

    def __init__(self, cfg, count: int, device: torch.device, dtype: torch.dtype, past: int, seed: int):
        from transformers import Qwen2Config
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

        hc = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=1,
                         num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                         rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
        hc._attn_implementation = "sdpa"  # transformers' default attention
        torch.manual_seed(seed)
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        kv_shape = (1, cfg.num_key_value_heads, past, cfg.head_dim)
        with torch.device(device):  # initialised on the device: nothing 7B-sized passes through the host
            self.embed = nn.Embedding(cfg.vocab_size, h).to(dtype)
            self.final_norm = Qwen2RMSNorm(h, eps).to(dtype)
            self.lm_head = nn.Linear(h, cfg.vocab_size, bias=False).to(dtype)
            self.rotary = Qwen2RotaryEmbedding(hc)
            self.modules = []
            for _ in range(count):
                m = nn.ModuleDict({"emb_norm": Qwen2RMSNorm(h, eps), "hid_norm": Qwen2RMSNorm(h, eps),
                                   "proj": nn.Linear(2 * h, h, bias=False),
                                   "layer": Qwen2DecoderLayer(hc, layer_idx=0)}).to(dtype).eval()
                m.past = FixedPast(torch.randn(kv_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype))
                self.modules.append(m)
        self.device, self.dtype, self.past = device, dtype, past

    def inputs(self, rows: int, vocab: int, gen: torch.Generator) -> dict:
        """Ids, previous-stage hidden rows, RoPE positions (module 0: slot + 1) and the causal mask."""
        dev, p = self.device, self.past
        mask = torch.zeros(rows, p + rows)
        mask[:, p:] = torch.full((rows, rows), float("-inf")).triu(1)
        return {"ids": torch.randint(0, vocab, (1, rows), generator=gen).to(dev),
                "hidden": torch.randn((1, rows, self.embed.embedding_dim), generator=gen).to(dev, self.dtype),
                "positions": torch.arange(p + 1, p + 1 + rows, device=dev)[None],
                "mask": mask[None, None].to(dev, self.dtype)}

    @torch.no_grad()
    def run(self, count: int, ids, hidden, positions, mask) -> torch.Tensor:
        """Modules 0..count-1 as VITA-Audio's transformers code runs them; returns the last id."""
        for m in self.modules[:count]:
            e = m["emb_norm"](self.embed(ids))
            u = m["proj"](torch.cat([e, m["hid_norm"](self.final_norm(hidden))], dim=-1))
            out = m["layer"](u, attention_mask=mask, position_ids=positions, past_key_values=m.past, use_cache=True,
                             position_embeddings=self.rotary(u, positions))
            hidden = out[0] if isinstance(out, tuple) else out
            next_id = self.lm_head(self.final_norm(hidden[:, -1:])).argmax(dim=-1)
        return next_id


def weight_floors(model) -> dict[str, int]:
    """Bytes each region must read: a module's layer + projection + the full head (exact)."""
    cfg = model.cfg
    head = harness.tensor_bytes([model.lm_head, model.final_norm])

    def layer(i: int) -> int:
        return harness.tensor_bytes(vars(model.layers[i]).values())

    steps = [layer(cfg.num_llm_layers + k) + harness.tensor_bytes(vars(model.mtp[k]).values()) + head
             for k in range(cfg.num_mtp_modules)]
    return {"mctp_step": steps[0], "burst": sum(steps),
            "llm_step": sum(layer(i) for i in range(cfg.num_llm_layers)) + head}


def compiled_region(engine, settings: harness.Settings, first: int, rows: int, modules: int, params):
    """Our torch reference path (the same model, weights shared, over the `torch` backend) for
    modules 0..modules-1 over `rows` rows, under torch.compile."""
    from vita_kernels.backend import resolve_backend

    ref = copy.copy(engine.model)  # shallow: the weights are shared, only the kernel backend differs
    ref.ops = resolve_backend("torch", engine.model.device)
    runner, state = engine.runner, engine.runner.state
    # Module k's tables differ in the token each row reads ahead: a workspace of its own per module.
    steps = [runner.prepare([Span(0, first, rows, emit=True)], ahead=k + 1, fresh=True) for k in range(modules)]

    def region() -> None:
        for k in range(modules):
            ws = steps[k][0]
            ref.mtp_step(k, state, ws, first + rows)  # exact window: a fixed-length compiled region
            ref.emit(state, ws, None)

    # Static shapes: each (R, modules) gets code specialised to it, as a deployment would compile.
    torch._dynamo.reset()
    return torch.compile(region, mode=settings.compile_mode, dynamic=False)


def run(settings: harness.Settings, copy_gbps: float, args: argparse.Namespace | None = None,
        engine=None) -> dict:
    from vita_kernels.registry import GEOMETRIES

    start = time.perf_counter()
    load_s = None
    if engine is None:
        engine, load_s = harness.load_engine(settings)
    cfg, runner, model = engine.cfg, engine.runner, engine.model
    n = cfg.num_mtp_modules
    params = engine.sampling_params(do_sample=False, repetition_penalty=1.0)  # greedy: the fused head argmax
    step_params = [params]
    prompt = harness.prompt_ids(engine, settings.prompt_len, settings.seed)
    first = len(prompt)
    row_counts = GEOMETRIES[settings.geometry].rows
    # Real activations behind every row the steps read: a Turbo generation fills the KV cache of
    # every layer, each module's hidden history and the token buffer well past first + R + N.
    engine.generate(prompt, mode="turbo", max_new_tokens=min(64, settings.max_seq_len - first),
                    do_sample=False, ignore_eos=True)
    floors = weight_floors(model)
    notes = [f"ours: backend {engine.kernels.name} {engine.kernels.choice}",
             f"floors (weight bytes): MCTP step {harness.size_text(floors['mctp_step'])}, burst of {n} "
             f"{harness.size_text(floors['burst'])}, LLM step {harness.size_text(floors['llm_step'])}"]
    rows: list[dict] = []
    ours_us: dict[tuple, float] = {}

    def record(region: str, r: int, impl: str, fn, note: str = "") -> None:
        """Time fn as called (ours replays the runner's own graph; the peers run as they are used)."""
        row = {"region": region, "rows": r, "impl": impl, "bytes_moved": floors[region]}
        try:
            t = harness.time_fn(fn, settings)
        except Exception as exc:  # noqa: BLE001 - a failing peer must not stop the suite
            harness.sync(settings.device)
            row.update(us=None, note=f"error: {harness._first_line(exc)}")
            rows.append(row)
            return
        if impl == OURS:
            ours_us[(region, r)] = t.median_us
        base = ours_us.get((region, r))
        row.update(us=t.median_us, p20_us=t.p20_us, p80_us=t.p80_us, spread=f"{t.p20_us:.1f}-{t.p80_us:.1f}",
                   vs_ours=t.median_us / base if base else None, note="; ".join(filter(None, [note, t.note])),
                   **harness.roofline(floors[region], t.median_us, copy_gbps))
        rows.append(row)

    graphs_note = "" if runner.use_graphs else "eager: no CUDA graphs on this device"
    for r in row_counts:
        span = [Span(0, first, r, emit=True)]
        record("mctp_step", r, OURS, lambda span=span: runner.mtp_step(0, span, step_params), note=graphs_note)
        record("burst", r, OURS, lambda span=span: [runner.mtp_step(k, span, step_params) for k in range(n)],
               note=graphs_note)
    record("llm_step", 1, OURS, lambda: runner.llm_step([Span(0, first, 1, emit=True)], step_params),
           note=graphs_note)
    harness.sync(settings.device)

    def transformers_peer() -> None:  # its modules (7.6 GB at 7B) are freed on return
        hf = HFModules(cfg, n, model.device, model.dtype, past=first, seed=settings.seed)
        gen = torch.Generator().manual_seed(settings.seed)
        for r in row_counts:
            inputs = hf.inputs(r, cfg.vocab_size, gen)
            record("mctp_step", r, HF, lambda inputs=inputs: hf.run(1, **inputs))
            record("burst", r, HF, lambda inputs=inputs: hf.run(n, **inputs))

    try:
        transformers_peer()
    except Exception as exc:  # noqa: BLE001 - e.g. a transformers API change; ours still reported
        notes.append(f"{HF} peer failed: {harness._first_line(exc)}")
    harness.free_memory()

    if settings.compile:
        # Compiling is minutes at max-autotune: every step, but the burst only at the largest R.
        plan = [("mctp_step", r, 1) for r in (row_counts[:1] if settings.quick else row_counts)]
        plan += [] if settings.quick else [("burst", row_counts[-1], n)]
        for region, r, modules in plan:
            if settings.time_left() < 150:
                notes.append(f"{COMPILED} {region} R={r} skipped: the time budget is nearly spent")
                continue
            t0 = time.perf_counter()
            try:
                fn = compiled_region(engine, settings, first, r, modules, params)
                fn()
                harness.sync(settings.device)
            except Exception as exc:  # noqa: BLE001
                rows.append({"region": region, "rows": r, "impl": COMPILED, "us": None,
                             "note": f"error: {harness._first_line(exc)}"})
                continue
            record(region, r, COMPILED, fn, note=f"mode={settings.compile_mode}, compiled in "
                                                 f"{time.perf_counter() - t0:.0f} s")
            del fn
        torch._dynamo.reset()
    elif not settings.smoke:
        notes.append(f"{COMPILED} peers skipped (--no-compile)")
    harness.free_memory()
    order = {"mctp_step": 0, "burst": 1, "llm_step": 2}
    rows.sort(key=lambda x: (order[x["region"]], x["rows"]))
    return {"preset": settings.preset, "dtype": settings.dtype, "past_positions": first, "modules": n,
            "head": "exact full vocabulary", "floors_bytes": floors, "rows": rows, "notes": notes,
            "engine_load_s": load_s, "elapsed_s": time.perf_counter() - start}


def step_us(section: dict, region: str = "mctp_step", rows: int = 1, impl: str = OURS) -> float | None:
    for r in section.get("rows", []):
        if (r["region"], r["rows"], r["impl"]) == (region, rows, impl):
            return r.get("us")
    return None


def render(section: dict) -> str:
    text = [f"### MCTP step and burst ({section['preset']} preset, {section['dtype']}, batch 1, "
            f"{section['past_positions']} past positions, {section['head']} head)", "",
            harness.markdown_table(section["rows"], COLUMNS), "",
            "peer / ours: the peer's time over ours (above 1: ours is faster).", ""]
    text += [f"- {n}" for n in section["notes"]]
    return "\n".join(text).rstrip() + "\n"


def chart_panels(section: dict) -> list[dict]:
    panels = []
    for region in dict.fromkeys(r["region"] for r in section["rows"]):
        rows = [r for r in section["rows"] if r["region"] == region]
        labels = [f"R{r}" for r in dict.fromkeys(r["rows"] for r in rows)]
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        lookup = {(f"R{r['rows']}", r["impl"]): r.get("us") for r in rows}
        floor = {f"R{r['rows']}": r.get("floor_us") for r in rows if r.get("floor_us")}
        panels.append({"title": region.replace("_", " "), "labels": labels,
                       "series": {i: [lookup.get((c, i)) for c in labels] for i in impls},
                       "floor_us": [floor.get(c) for c in labels]})
    return panels


def main(argv: list[str] | None = None) -> int:
    return harness.standalone("bench_mctp_step", run, render, argv)


if __name__ == "__main__":
    raise SystemExit(main())
