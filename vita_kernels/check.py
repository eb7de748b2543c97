"""Check every registered op's implementations against its reference.

    python -m vita_kernels.check [--device cpu|cuda] [--dtype fp32,bf16,fp16] [--shapes tiny|7b]
                                 [--ops a,b] [--impl triton|cuda|flash|all]

prints one row per (op, implementation, case, dtype, out= given or not, output) and exits
non-zero if any comparison fails. On the CPU, Triton kernels run through the interpreter:
TRITON_INTERPRET=1 is set before any op module is imported.

How a comparison passes (`compare_impl`, which the tests reuse):
- Every case runs twice, with `out=` poisoned (NaN, or the lowest integer) and without `out=`;
  arguments the op mutates (`Case.mutated`) are cloned for each run and compared too; an
  argument the op must not write is checked to be unchanged. NaN never passes.
- fp32: elementwise |impl - ref| <= atol + rtol * |ref| (the fp32 row of tests/conftest.py).
- bf16/fp16: the reference run on fp32 copies of the same inputs is the truth, the reference
  run in the low dtype is the baseline; pass when max|impl - truth| <= 2 * max|baseline - truth|
  + a tiny atol (LOW_ATOL_REL * max|truth|). No allowance for the CPU interpreter's truncating
  fp32 -> bf16 casts: kernels round through `_tl.round_to`, as on a GPU.
- Integer outputs must match exactly.
- compare == "argmax": the chosen id's true score must be within 2 * baseline score error +
  atol of the row's true maximum. The scores come from the op named like this one with
  "argmax" replaced by "logits" (head_argmax -> head_logits).
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# The fp32 rows of tests/conftest.py's TOLERANCES (tests/test_kernels.py asserts they agree):
# the CPU interpreter is exact fp32 arithmetic in another order; GPU tl.dot may use TF32.
FP32_TOLERANCE = {"cpu": dict(atol=1e-4, rtol=1e-4), "cuda": dict(atol=2e-3, rtol=2e-3)}
# bf16/fp16 pass when err(impl) <= 2 * err(baseline) + LOW_ATOL_REL * max|truth|: the slack only
# matters where the baseline happens to be exact.
LOW_ATOL_REL = 1e-5


@dataclass
class Result:
    """One compared output (or mutated argument) of one implementation on one case."""

    op: str
    impl: str
    case: str
    dtype: str
    out_given: bool
    output: str
    max_abs: float = math.nan
    max_rel: float = math.nan
    tolerance: str = ""
    passed: bool = False
    note: str = ""


def impl_skip_reason(impl_name: str, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why an implementation cannot run on this device and dtype, or None when it can."""
    from vita_kernels.backend import cuda_extension, triton_runs_on

    device = torch.device(device)
    if impl_name == "triton" and not triton_runs_on(device):
        return "Triton on the CPU needs TRITON_INTERPRET=1 set before vita_kernels' op modules are imported"
    if impl_name == "cuda":
        if device.type != "cuda":
            return "the CUDA extension needs a CUDA device"
        if cuda_extension() is None:
            return "vita_kernels._C is not built here"
    if impl_name == "flash":
        if device.type != "cuda":
            return "flash-attn needs a CUDA device"
        if dtype == torch.float32:
            return "flash-attn supports fp16/bf16 only"
    return None


def _upcast(value, dtype: torch.dtype):
    """fp32 copy of a tensor of the case dtype (exact), anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dtype == dtype and dtype != torch.float32:
        return value.float()
    return value


def _clone_args(kwargs: dict, names: Iterable[str]) -> dict:
    """`kwargs` with fresh copies of the tensors named in `names`; the others shared."""
    names = set(names)
    return {k: (v.clone() if k in names and isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}


def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout: rows padded by 16 elements (the layout of a
    slice of a wider buffer), or every other element for 1-D tensors."""
    if t.dim() >= 2:
        buf = torch.empty((*t.shape[:-1], t.shape[-1] + 16), dtype=t.dtype, device=t.device)
        view = buf[..., : t.shape[-1]]
    else:
        view = torch.empty(2 * t.numel(), dtype=t.dtype, device=t.device)[::2]
    view.copy_(t)
    return view


def _outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _output_names(n: int) -> list[str]:
    return ["out"] if n == 1 else [f"out[{i}]" for i in range(n)]


def _poison(like: torch.Tensor, noncontiguous: bool) -> torch.Tensor:
    fill = math.nan if like.is_floating_point() else torch.iinfo(like.dtype).min
    out = torch.full_like(like, fill)
    return _strided_copy(out) if noncontiguous and out.numel() > 1 else out


def _low_slack(scale: float) -> float:
    return LOW_ATOL_REL * max(scale, 1e-6)


def _compare_close(impl: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype,
                   device: torch.device) -> tuple[float, float, str, bool, str]:
    """(max abs err, max rel err, tolerance text, passed, note) of impl against truth."""
    if impl.shape != truth.shape:
        return math.nan, math.nan, "", False, f"shape {list(impl.shape)}, expected {list(truth.shape)}"
    if impl.dtype != baseline.dtype:
        return math.nan, math.nan, "", False, f"dtype {impl.dtype}, expected {baseline.dtype}"
    if not impl.is_floating_point():
        diff = (impl.long() - truth.long()).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        return max_abs, max_abs, "exact", bool(torch.equal(impl.long(), truth.long())), ""
    impl_f, truth_f = impl.double(), truth.double()
    diff = (impl_f - truth_f).abs()
    scale = float(truth_f.abs().max()) if truth_f.numel() else 0.0
    nan = bool(torch.isnan(impl_f).any())
    max_abs = math.nan if nan else (float(diff.max()) if diff.numel() else 0.0)
    rel_floor = max(1e-3 * scale, 1e-12)
    max_rel = math.nan if nan else (float((diff / truth_f.abs().clamp_min(rel_floor)).max()) if diff.numel() else 0.0)
    note = "NaN in output" if nan else ""
    if dtype == torch.float32:
        tol = FP32_TOLERANCE["cuda" if device.type == "cuda" else "cpu"]
        ok = not nan and bool((diff <= tol["atol"] + tol["rtol"] * truth_f.abs()).all())
        return max_abs, max_rel, f"atol={tol['atol']:g} rtol={tol['rtol']:g}", ok, note
    base_err = float((baseline.double() - truth_f).abs().max()) if diff.numel() else 0.0
    bound = 2.0 * base_err + _low_slack(scale)
    ok = not nan and max_abs <= bound
    return max_abs, max_rel, f"<= {bound:.3g} (2 x base {base_err:.3g} + slack)", ok, note


def _scores_spec(spec):
    from vita_kernels.registry import get_op

    name = spec.name.replace("argmax", "logits")
    try:
        return get_op(name)
    except KeyError:
        raise KeyError(f"op {spec.name!r} compares by argmax and needs an op {name!r} giving its scores") from None


def _compare_argmax(ids: torch.Tensor, truth_scores: torch.Tensor, base_scores: torch.Tensor, dtype: torch.dtype,
                    device: torch.device) -> tuple[float, float, str, bool, str]:
    """Each row's chosen id must have a true score within tolerance of the row's true maximum."""
    rows, vocab = truth_scores.shape
    if ids.shape != (rows,) or ids.dtype != torch.int64:
        return math.nan, math.nan, "", False, f"ids {ids.dtype} {list(ids.shape)}, expected int64 [{rows}]"
    if bool(((ids < 0) | (ids >= vocab)).any()):
        return math.nan, math.nan, "", False, f"ids {ids.tolist()} outside [0, {vocab})"
    truth = truth_scores.double()
    best = truth.max(dim=-1).values
    gap = best - truth.gather(1, ids.long()[:, None]).squeeze(1)
    scale = float(truth.abs().max())
    max_gap = float(gap.max())
    if dtype == torch.float32:
        tol = FP32_TOLERANCE["cuda" if device.type == "cuda" else "cpu"]
        bound = tol["atol"] + tol["rtol"] * scale
    else:
        base_err = float((base_scores.double() - truth).abs().max())
        bound = 2.0 * base_err + _low_slack(scale)
    return max_gap, max_gap / max(scale, 1e-12), f"score gap <= {bound:.3g}", max_gap <= bound, ""


def compare_impl(
    spec,
    impl_name: str,
    geom,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    seed: int = 0,
    case_names: Iterable[str] | None = None,
    out_modes: Iterable[bool] = (True, False),
    noncontiguous: bool = False,
) -> list[Result]:
    """Run `spec.impls[impl_name]` against `spec.ref` on the op's cases; one Result per output.

    `out_modes`: True runs with a poisoned `out=` (only for ops whose reference takes `out`),
    False without. `noncontiguous`: the implementation gets every tensor argument (and `out`)
    in a strided layout; a ValueError that names some of them is a clear refusal (noted in the
    result), and the call is retried with those arguments contiguous; it must then pass.
    """
    device = torch.device(device)
    impl = spec.impls[impl_name]
    dname = DTYPE_NAMES[dtype]
    takes_out = "out" in inspect.signature(spec.ref).parameters
    gen = torch.Generator().manual_seed(seed)
    cases = spec.cases(geom, dtype, device, gen)
    if case_names is not None:
        wanted = set(case_names)
        unknown = wanted - {c.name for c in cases}
        if unknown:
            raise KeyError(f"op {spec.name!r} has no case(s) {sorted(unknown)}; it has {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in wanted]
    scores = _scores_spec(spec) if spec.compare == "argmax" else None
    results = []
    for case in cases:
        mutated = tuple(case.mutated)
        truth_args = _clone_args({k: _upcast(v, dtype) for k, v in case.kwargs.items()}, mutated)
        base_args = _clone_args(case.kwargs, mutated)
        truth_outs = _outputs(spec.ref(**truth_args))
        base_outs = _outputs(spec.ref(**base_args))
        if scores is not None:
            truth_scores = scores.ref(**{k: _upcast(v, dtype) for k, v in case.kwargs.items()})
            base_scores = scores.ref(**case.kwargs)
        for out_given in out_modes:
            if out_given and not takes_out:
                continue

            def row(output: str, **kw) -> Result:
                return Result(spec.name, impl_name, case.name, dname, out_given, output, **kw)

            # With `noncontiguous`, a ValueError naming strided arguments is a clear refusal: those
            # arguments go back to a contiguous layout and the call is retried, so the arguments
            # the launcher does accept strided are still exercised.
            keep_contiguous: list[str] = []
            while True:
                # Private copies of every tensor: mutated ones start fresh, and any other write shows.
                args = _clone_args(case.kwargs, case.kwargs.keys())
                strided = []
                if noncontiguous:
                    for k, v in args.items():
                        if isinstance(v, torch.Tensor) and v.numel() > 1 and k not in keep_contiguous:
                            args[k] = _strided_copy(v)
                            strided.append(k)
                out = None
                if out_given:
                    out = _poison(base_outs[0], noncontiguous and "out" not in keep_contiguous)
                    args["out"] = out
                    if not out.is_contiguous():
                        strided.append("out")
                try:
                    result = impl(**args)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    error = None
                except ValueError as e:
                    named = [k for k in strided if re.search(rf"\b{re.escape(k)}\b", str(e))]
                    if noncontiguous and named:
                        keep_contiguous += named
                        continue
                    error = f"ValueError: {e}"
                except Exception as e:  # noqa: BLE001 - a crash is a failed comparison, reported in the table
                    error = f"{type(e).__name__}: {str(e)[:200]}"
                break
            refused = f"refused strided {keep_contiguous}" if keep_contiguous else ""
            if error is not None:
                results.append(row("out", note="; ".join(filter(None, [refused, error]))))
                continue
            impl_outs = _outputs(result)
            names = _output_names(len(truth_outs))
            if len(impl_outs) != len(truth_outs):
                results.append(row("out", note=f"{len(impl_outs)} outputs, expected {len(truth_outs)}"))
                continue
            for name, got, truth, base in zip(names, impl_outs, truth_outs, base_outs):
                if scores is not None:
                    cmp = _compare_argmax(got, truth_scores, base_scores, dtype, device)
                else:
                    cmp = _compare_close(got, truth, base, dtype, device)
                max_abs, max_rel, tol, ok, note = cmp
                if out_given and name == names[0] and got is not out:
                    ok, note = False, (note + "; " if note else "") + "did not return the out= tensor"
                note = "; ".join(filter(None, [refused, note]))
                results.append(row(name, max_abs=max_abs, max_rel=max_rel, tolerance=tol, passed=ok, note=note))
            for name in mutated:
                cmp = _compare_close(args[name], truth_args[name], base_args[name], dtype, device)
                max_abs, max_rel, tol, ok, note = cmp
                results.append(row(name, max_abs=max_abs, max_rel=max_rel, tolerance=tol, passed=ok, note=note))
            for name, value in case.kwargs.items():
                if name in mutated or not isinstance(value, torch.Tensor):
                    continue
                if not torch.equal(args[name], value):
                    results.append(row(name, note=f"the op wrote to its input {name!r}"))
    return results


def format_table(results: list[Result]) -> str:
    """A markdown table of results."""
    lines = ["| op | impl | case | dtype | out= | output | max abs err | max rel err | tolerance | pass |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        verdict = "ok" if r.passed else "FAIL"
        if r.note:
            verdict += f" ({r.note})"
        lines.append(f"| {r.op} | {r.impl} | {r.case} | {r.dtype} | {'given' if r.out_given else 'none'} | {r.output} "
                     f"| {r.max_abs:.3g} | {r.max_rel:.3g} | {r.tolerance} | {verdict} |")
    return "\n".join(lines)


def run_checks(device: torch.device, dtypes: list[torch.dtype], geom_name: str, op_names: list[str] | None,
               impl: str, log: Callable[[str], None] = print) -> tuple[list[Result], list[str]]:
    """Every (op, implementation, dtype) selected; returns (results, skipped lines)."""
    from vita_kernels.registry import GEOMETRIES, ops

    geom = GEOMETRIES[geom_name]
    specs = ops()
    if op_names:
        known = {s.name for s in specs}
        unknown = [n for n in op_names if n not in known]
        if unknown:
            raise SystemExit(f"unknown op(s) {unknown}; known: {sorted(known)}")
        specs = [s for s in specs if s.name in op_names]
    results, skipped = [], []
    for spec in specs:
        names = list(spec.impls) if impl == "all" else [impl]
        if not spec.impls:
            skipped.append(f"{spec.name}: no implementations registered")
            continue
        for name in names:
            if name not in spec.impls:
                skipped.append(f"{spec.name}/{name}: not registered (registered: {', '.join(spec.impls)})")
                continue
            for dtype in dtypes:
                reason = impl_skip_reason(name, device, dtype)
                if reason:
                    skipped.append(f"{spec.name}/{name}/{DTYPE_NAMES[dtype]}: {reason}")
                    continue
                rows = compare_impl(spec, name, geom, dtype, device)
                failed = sum(not r.passed for r in rows)
                log(f"{spec.name}/{name}/{DTYPE_NAMES[dtype]}: {len(rows)} comparisons, {failed} failed")
                results.extend(rows)
    return results, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vita_kernels.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu (Triton through its interpreter)")
    parser.add_argument("--dtype", default="fp32,bf16,fp16", help="comma-separated: fp32,bf16,fp16")
    parser.add_argument("--shapes", choices=("tiny", "7b"), default="tiny")
    parser.add_argument("--ops", default=None, help="comma-separated op names (default: all)")
    parser.add_argument("--impl", default="all", help="triton, cuda, flash or all (default)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if device.type == "cpu":
        # Must precede the op modules' import: @triton.jit decides at decoration time.
        os.environ["TRITON_INTERPRET"] = "1"
        if args.shapes == "7b":
            print("note: 7b shapes through the CPU interpreter take a very long time", file=sys.stderr)
    try:
        dtypes = [DTYPES[d.strip()] for d in args.dtype.split(",") if d.strip()]
    except KeyError as e:
        parser.error(f"--dtype: unknown {e}; expected {', '.join(DTYPES)}")
    op_names = [o.strip() for o in args.ops.split(",")] if args.ops else None

    results, skipped = run_checks(device, dtypes, args.shapes, op_names, args.impl,
                                  log=lambda s: print(s, file=sys.stderr))
    print(format_table(results))
    if skipped:
        print("\nskipped:")
        for line in skipped:
            print(f"- {line}")
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results)} comparisons on {device} ({args.shapes}), {len(failed)} failed, {len(skipped)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
