"""Compile every registered Triton kernel ahead of time for a CUDA architecture, without a GPU.

    python -m vita_kernels.aot [--arch 90 80] [--report DIR] [--only LABEL ...]

An op module describes its launches in one of two ways:

- `aot_launches()`: (label, `_tl.Launch`) pairs, the launches its launcher plans for the 7B
  shapes at every AOT row count (meta tensors stand in for the GPU tensors). Each is compiled
  with the JIT's own specialisation: Triton's launch-time binder
  (`create_function_from_signature`) and `JITFunction._pack_args` turn the launch's arguments
  into the signature, constexprs and attributes the JIT would compile, so integers equal to 1
  become constants, integers and pointers divisible by 16 are declared so (`tt.divisibility`),
  and num_warps / num_stages are the launcher's. The AOT build is then the kernel that runs.
  (Same two functions, same signatures, in Triton 3.6 and 3.9; refused with a reason otherwise.)
- `aot_variants()` (older modules): (jit kernel, signature, constexprs[, options]) tuples,
  compiled with every pointer declared 16-byte aligned.

Then `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32), options)`; the table
reports registers per thread, the stack frame (spilled registers: these kernels use no local
arrays) and shared memory, read from the cubin with cuobjdump. `--report DIR` also writes
report.md and report.json: per op and row count, the grid, occupancy, weight bytes, bytes in
flight, the width of the weight loads and the shuffles found in the PTX, and an expected
bandwidth band, all derived from the compiled code (not a measurement). Exits non-zero if any
variant fails to compile. TRITON_INTERPRET is removed from this process's environment before
the op modules are imported (the kernels must be real @triton.jit functions).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field


@dataclass
class Variant:
    """One compile: a planned launch (compiled with the JIT's specialisation) or a legacy tuple."""
    module: str
    kernel: object
    label: str
    launch: object = None  # _tl.Launch
    legacy: tuple | None = None  # (signature, constexprs, options)


@dataclass
class AotResult:
    module: str
    kernel: str
    variant: str
    arch: int
    ok: bool
    cubin_bytes: int = 0
    registers: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    error: str = ""
    analysis: dict = field(default_factory=dict)


def collect_variants() -> tuple[list[Variant], list[str]]:
    """Every registered op module's variants, and the modules skipped (no Triton kernel)."""
    from vita_kernels.registry import ops

    modules: list[str] = []
    for spec in ops():
        name = spec.ref.__module__
        if name not in modules:
            modules.append(name)
    variants, skipped = [], []
    for name in modules:
        module = importlib.import_module(name)
        if hasattr(module, "aot_launches"):
            for label, launch in module.aot_launches():
                variants.append(Variant(name, launch.kernel, label, launch=launch))
        elif hasattr(module, "aot_variants"):
            for v in module.aot_variants():
                kernel, signature, constexprs = v[:3]
                options = dict(v[3]) if len(v) > 3 and v[3] else {}
                variants.append(Variant(name, kernel, describe(signature, constexprs, options),
                                        legacy=(signature, constexprs, options)))
        else:
            skipped.append(f"{name}: no aot_launches() or aot_variants() (no Triton kernel registered yet)")
    return variants, skipped


def describe(signature: dict, constexprs: dict, options: dict) -> str:
    """A short variant name: the pointer dtypes, then the constexprs and options."""
    dtypes = sorted({t[1:] for t in signature.values() if isinstance(t, str) and t.startswith("*")
                     and t[1:] not in ("i64", "i32")})
    parts = ["/".join(dtypes)] if dtypes else []
    parts += [f"{k}={v}" for k, v in constexprs.items()]
    parts += [f"{k}={v}" for k, v in options.items()]
    return " ".join(parts)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the cubin's kernel, from `cuobjdump --dump-resource-usage`."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                                 capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def pointer_alignment_attrs(signature: dict[str, str]) -> dict:
    """`ASTSource(..., attrs=)` declaring every pointer argument 16-byte aligned (legacy variants)."""
    return {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}


def jit_specialisation(launch, target) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) exactly as the JIT derives them for `launch`'s
    arguments on `target`: the binder the JIT builds per kernel and `_pack_args`, which is what
    `JITFunction.run` calls before compiling (Triton 3.6 and 3.9)."""
    from triton.compiler import make_backend
    from triton.runtime import jit

    kernel = launch.kernel
    if not (hasattr(jit, "create_function_from_signature") and hasattr(kernel, "_pack_args")
            and hasattr(kernel, "params")):
        raise RuntimeError("this Triton has no create_function_from_signature / JITFunction._pack_args (present "
                           "in 3.6 and 3.9): cannot reproduce the JIT's specialisation")
    backend = make_backend(target)
    binder = jit.create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def compile_variant(variant: Variant, arch: int) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from vita_kernels import _tl

    kernel = variant.kernel
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", repr(kernel))
    result = AotResult(variant.module, name, variant.label, arch, ok=False)
    if not isinstance(kernel, JITFunction):
        result.error = (f"{name} is a {type(kernel).__name__}, not a JITFunction: it was created under "
                        "TRITON_INTERPRET=1; run the AOT compile in a fresh process")
        return result
    target = GPUTarget("cuda", arch, 32)
    try:
        if variant.launch is not None:
            signature, constexprs, attrs, options = jit_specialisation(variant.launch, target)
            src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        else:
            signature, constexprs, options = variant.legacy
            # The launchers' own warp count unless the variant names one.
            options = {"num_warps": _tl.NUM_WARPS, **options}
            src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                            attrs=pointer_alignment_attrs(signature))
        compiled = triton.compile(src, target=target, options=options)
    except Exception as e:  # noqa: BLE001 - reported per variant
        first = str(e).strip().splitlines()
        result.error = f"{type(e).__name__}: {first[0] if first else ''}"[:300]
        return result
    cubin = compiled.asm.get("cubin", b"")
    usage = resource_usage(cubin)
    result.ok = bool(cubin)
    result.error = "" if cubin else "no cubin produced"
    result.cubin_bytes = len(cubin)
    result.registers = usage.get("REG")
    result.stack_bytes = None if "STACK" not in usage else usage["STACK"] + usage.get("LOCAL", 0)
    result.shared_bytes = getattr(compiled.metadata, "shared", None)
    result.analysis = ptx_analysis(compiled.asm.get("ptx", ""))
    if variant.launch is not None:
        result.analysis["launch"] = launch_geometry(variant.launch)
        # What the JIT's specialisation added beyond the launcher's constexprs.
        names = kernel.arg_names
        result.analysis["specialised"] = dict(
            constant=sorted(names[path[0]] for path in constexprs if names[path[0]] not in variant.launch.kwargs),
            divisible_by_16=sorted(names[path[0]] for path, attr in attrs.items() if attr))
    return result


# ----------------------------------------------------------------------------- PTX analysis

_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")


def _loop_lines(lines: list[str]) -> set[int]:
    """Indices of lines inside a loop: from a label to a later branch back to it."""
    where = {}
    inside: set[int] = set()
    for i, line in enumerate(lines):
        m = _LABEL.match(line.strip())
        if m:
            where[m.group(1)] = i
        b = _BRANCH.search(line)
        if b and b.group(1) in where and where[b.group(1)] < i:
            inside.update(range(where[b.group(1)], i + 1))
    return inside


def _load_bits(line: str) -> int:
    """Bits moved per thread by one global load / async copy instruction."""
    m = re.search(r"\b0x([0-9a-f]+)\s*,", line) if "cp.async" in line else None
    if m:
        return 8 * int(m.group(1), 16)
    vec = re.search(r"\.v(\d)\.", line)
    width = re.search(r"\.[bfu](\d+)\s", line)
    return (int(vec.group(1)) if vec else 1) * (int(width.group(1)) if width else 32)


def ptx_analysis(ptx: str) -> dict:
    """What the PTX says about the main loop: weight loads (the evict-first ones: plain
    ld.global with an L1::evict_first / L2 cache hint, or cp.async with the L2 evict-first
    policy) and their widths, whether they are asynchronous copies (pipelined through shared
    memory), and shuffles inside and outside loops."""
    lines = ptx.splitlines()
    loops = _loop_lines(lines)
    weight_bits: list[int] = []
    async_bits: list[int] = []
    weight_async = False
    other_loads_in_loop = 0
    shfl_in, shfl_out = 0, 0
    for i, line in enumerate(lines):
        text = line.strip()
        if "shfl.sync" in text:
            if i in loops:
                shfl_in += 1
            else:
                shfl_out += 1
        is_load = re.search(r"\b(ld\.global|cp\.async\.c[ag])", text)
        if not is_load:
            continue
        if "cp.async" in text:
            async_bits.append(_load_bits(text))
        if "evict_first" in text or ("cp.async" in text and "L2::cache_hint" in text):
            weight_bits.append(_load_bits(text))
            weight_async |= "cp.async" in text and i in loops
        elif i in loops:
            other_loads_in_loop += 1
    # Triton 3.6's software pipeliner drops the eviction policy of the loads it turns into
    # cp.async: then the weight tiles cannot be told from the activation tiles, and every
    # asynchronous copy stands for them (a stricter test: all of them must be 16 bytes).
    marked = bool(weight_bits)
    if not marked and async_bits:
        weight_bits, weight_async = async_bits, True
    return dict(weight_load_bits=sorted(set(weight_bits)), weight_loads=len(weight_bits),
                weight_loads_async=weight_async, evict_first_in_ptx=marked, shfl_in_loops=shfl_in,
                shfl_outside_loops=shfl_out, other_loads_in_loops=other_loads_in_loop)


# ----------------------------------------------------------------------------- report

SMS = 132
REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
# Loaded DRAM latency range used for Little's law (ns), and the measured copy ceilings (TB/s).
LATENCY_NS = (600, 1000)
CEILING_TBS = {"H100": 3.0, "H200": 4.3}


def launch_geometry(launch) -> dict:
    """Grid and configuration of a planned launch; for GEMV launches (BLOCK_N and BLOCK_K
    constexprs, a `w_ptr` weight argument) the weight bytes each program streams."""
    kw = launch.kwargs
    grid = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
    geo = dict(grid=list(grid), programs=grid[0] * grid[1] * grid[2],
               config={k: v for k, v in kw.items() if k.startswith("BLOCK") or k in ("SPLIT_K", "STATS_K")},
               num_warps=kw.get("num_warps", 4), num_stages=kw.get("num_stages", 3))
    names = launch.kernel.arg_names
    if "BLOCK_N" in kw and "BLOCK_K" in kw and "w_ptr" in names:
        weight = launch.args[names.index("w_ptr")]
        total = weight.numel() * weight.element_size()
        programs_per_read = grid[0] * grid[2]  # every row block reads the whole weight again
        per_program = total // programs_per_read
        k_range = weight.shape[1] // kw.get("SPLIT_K", 1)
        step = per_program * kw["BLOCK_K"] // k_range
        geo.update(gemv=True, weight_bytes=total, weight_reads=grid[1], weight_bytes_per_program=per_program,
                   weight_bytes_per_step=step, k_steps=math.ceil(k_range / kw["BLOCK_K"]))
    return geo


def occupancy(registers: int, shared: int, num_warps: int) -> int:
    """Resident programs per SM on an H100/H200 (sm_90) from registers and shared memory."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_regs = (REGS_PER_SM // per_warp) // num_warps if per_warp else 64
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_BLOCK)
    return max(0, min(by_regs, by_smem, 64 // num_warps, 32))


def derive(result: AotResult) -> dict:
    """Occupancy, bytes in flight and the expected bandwidth band of a GEMV variant."""
    a = result.analysis
    geo = a.get("launch", {})
    row = dict(geo)
    if not geo.get("gemv") or result.registers is None:
        return row
    per_sm = occupancy(result.registers, result.shared_bytes or 0, geo["num_warps"])
    resident = min(per_sm, math.ceil(geo["programs"] / SMS))
    # Weight tiles in flight per program: num_stages - 1 when the loop issues them as cp.async
    # (the software pipeline keeps that many steps ahead), else the one step whose loads are
    # issued together before the first use.
    depth = max(1, geo["num_stages"] - 1) if a["weight_loads_async"] else 1
    in_flight = resident * depth * geo["weight_bytes_per_step"]
    # Each SM streams its own programs' bytes: the busiest SM has ceil(programs / SMs) of them.
    per_sm_mean = geo["programs"] / SMS
    balance = per_sm_mean / math.ceil(per_sm_mean) if resident else 0.0
    band = {}
    for gpu, ceiling in CEILING_TBS.items():
        lo, hi = (min(ceiling, SMS * in_flight / ns / 1e3) * balance for ns in reversed(LATENCY_NS))
        band[gpu] = [round(lo, 2), round(hi, 2)]
    shfl_per_program = a["shfl_outside_loops"] + a["shfl_in_loops"] * geo["k_steps"]
    row.update(programs_per_sm=per_sm, resident_per_sm=resident, tiles_in_flight=depth,
               bytes_in_flight_per_sm=in_flight, wave_balance=round(balance, 3),
               shfl_per_16kb=round(shfl_per_program * geo["num_warps"] * 16384 / geo["weight_bytes_per_program"], 2),
               expected_tbs=band)
    return row


def variant_problems(result: AotResult) -> list[str]:
    """Why a GEMV-family variant is not at the floor by construction: spills, weight loads
    narrower than 128 bits, shuffles inside the K loop, more than one read of the weights."""
    problems = []
    if not result.ok:
        return [f"does not compile: {result.error}"]
    if result.stack_bytes:
        problems.append(f"{result.stack_bytes} bytes of stack (spilled registers)")
    geo = result.analysis.get("launch", {})
    if geo.get("gemv"):
        bits = result.analysis["weight_load_bits"]
        if not bits or bits != [128]:
            problems.append(f"weight loads of {bits or 'no identifiable'} bits, expected 128")
        if result.analysis["shfl_in_loops"] and geo["config"].get("BLOCK_R", 16) < 16:
            problems.append(f"{result.analysis['shfl_in_loops']} shuffles inside loops")
    return problems


def format_table(results: list[AotResult]) -> str:
    lines = ["| kernel | variant | arch | ok | cubin bytes | registers | stack (spills) bytes | shared bytes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ok = "ok" if r.ok else f"FAIL: {r.error}"

        def show(v):
            return "?" if v is None else str(v)

        lines.append(f"| {r.kernel} | {r.variant} | sm_{r.arch} | {ok} | {r.cubin_bytes} | {show(r.registers)} "
                     f"| {show(r.stack_bytes)} | {show(r.shared_bytes)} |")
    return "\n".join(lines)


REPORT_INTRO = """# GEMV-family kernels at the 7B shapes: static report

**Derived from compiled code, not a measurement.** Every row is a launch the launchers plan
for the 7B geometry (bf16; R = 1 also fp16), compiled for sm_{arch} by `python -m
vita_kernels.aot --report` with the JIT's own argument specialisation (Triton {triton}, code at
commit {commit}).
Registers, stack (spills) and shared memory come from the cubin (cuobjdump); weight-load
widths and shuffles from the PTX; the rest is arithmetic on those numbers:

- programs/SM: resident programs per SM on an H100/H200 (132 SMs, 64K registers and 228 KB
  shared memory per SM, 1 KB reserved per block, 64 warps), the tighter of registers and
  shared memory; resident = min(that, programs / 132 rounded up).
- weight B/program: the bytes of the weight matrix each program streams (weight bytes /
  programs along N and K; a row grid axis > 1 would read the weights that many times).
- in flight/SM: resident x tiles in flight x weight bytes per K step, where tiles in flight is
  num_stages - 1 when the K loop issues weight tiles as cp.async (software pipelined), else 1
  (the step's loads are issued together before their first use).
- 128-bit: every evict-first weight load is ld.global.v4.b32 or a 16-byte cp.async.
- shfl/16KB: warp shuffles executed per 16 KB of weights (shuffles outside loops once per
  program, inside loops once per K step, times warps).
- band (TB/s): Little's law, SMs x bytes in flight / loaded DRAM latency of {lat_hi} ns (low) to
  {lat_lo} ns (high), capped at the measured copy ceilings (H100 3.0, H200 4.3 TB/s), times the
  balance (mean programs per SM / the busiest SM's, programs / 132 rounded up). A band near the
  ceiling says the launch keeps enough bytes in flight and spreads evenly; it says nothing
  about what the model leaves out (L2 traffic of the activations, which every program of a
  launch re-reads: R x K x 2 bytes per program, 917 KB per program at R = 128 and K = 3584;
  instruction issue; the split-K epilogue and the argmax reduce, which are separate launches).
"""


def _git_commit() -> str:
    """The code's commit (with "+dirty" for uncommitted changes), or "unknown" outside a checkout."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def write_report(results: list[AotResult], directory: str) -> tuple[str, str]:
    import triton

    os.makedirs(directory, exist_ok=True)
    rows = []
    for r in results:
        entry = dict(module=r.module, kernel=r.kernel, variant=r.variant, arch=r.arch, ok=r.ok,
                     registers=r.registers, spill_stack_bytes=r.stack_bytes, shared_bytes=r.shared_bytes,
                     ptx=r.analysis and {k: v for k, v in r.analysis.items() if k not in ("launch", "specialised")},
                     specialised=r.analysis.get("specialised"),
                     problems=variant_problems(r), **derive(r))
        rows.append(entry)
    arch = results[0].arch if results else 90
    commit = _git_commit()
    md = [REPORT_INTRO.format(arch=arch, triton=triton.__version__, commit=commit, lat_lo=LATENCY_NS[0],
                              lat_hi=LATENCY_NS[1]), ""]
    md += ["| op, dtype, rows | kernel | grid | BLOCK R/N/K, split, warps, stages | regs | spills B | smem B "
           "| programs/SM | weight B/program | in flight/SM | 128-bit | shfl/16KB | H100 band | H200 band |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in rows:
        if e["arch"] != arch or not e.get("grid"):
            continue
        cfg = e.get("config", {})
        conf = (f"{cfg.get('BLOCK_R', '-')}/{cfg.get('BLOCK_N', '-')}/{cfg.get('BLOCK_K', '-')}, "
                f"{cfg.get('SPLIT_K', '-')}, {e['num_warps']}, {e['num_stages']}") if e.get("gemv") else "-"
        wide = "-" if not e.get("gemv") else ("yes" if e["ptx"]["weight_load_bits"] == [128] else
                                               f"NO {e['ptx']['weight_load_bits']}")
        md.append(f"| {e['variant']} | {e['kernel']} | {'x'.join(map(str, e['grid']))} | {conf} | {e['registers']} "
                  f"| {e['spill_stack_bytes']} | {e['shared_bytes']} | {e.get('programs_per_sm', '-')} "
                  f"| {e.get('weight_bytes_per_program', '-')} | {e.get('bytes_in_flight_per_sm', '-')} | {wide} "
                  f"| {e.get('shfl_per_16kb', '-')} | {e.get('expected_tbs', {}).get('H100', '-')} "
                  f"| {e.get('expected_tbs', {}).get('H200', '-')} |")
    problems = [f"- {e['variant']} {e['kernel']} sm_{e['arch']}: {'; '.join(e['problems'])}" for e in rows
                if e["problems"] and e.get("gemv")]
    md += ["", "## Problems in GEMV-family variants", ""] + (problems or ["None: no spills, every weight load is "
                                                                        "128-bit, no shuffles in broadcast K loops."])
    md_path, json_path = os.path.join(directory, "report.md"), os.path.join(directory, "report.json")
    with open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")
    with open(json_path, "w") as f:
        json.dump(dict(note="derived from compiled code, not a measurement", triton=triton.__version__,
                       git_commit=commit,
                       sms=SMS, regs_per_sm=REGS_PER_SM, smem_per_sm=SMEM_PER_SM, latency_ns=LATENCY_NS,
                       ceilings_tbs=CEILING_TBS, variants=rows), f, indent=1)
    return md_path, json_path


# ----------------------------------------------------------------------------- driver

_VARIANTS: list[Variant] | None = None


def _compile_task(task: tuple[int, int]) -> AotResult:
    """Worker entry: compile variant `index` of collect_variants() for `arch` (forked workers
    inherit the parent's imported modules; they re-list the variants, which is cheap)."""
    global _VARIANTS
    if _VARIANTS is None:
        _VARIANTS = collect_variants()[0]
    index, arch = task
    return compile_variant(_VARIANTS[index], arch)


def _compile_key(variant: Variant, arch: int) -> str:
    """Planned launches that specialise identically (R = 11 and 14, say) compile once."""
    if variant.launch is None:
        return f"{id(variant)} {arch}"
    from triton.backends.compiler import GPUTarget

    try:
        signature, constexprs, attrs, options = jit_specialisation(variant.launch, GPUTarget("cuda", arch, 32))
    except Exception:  # noqa: BLE001 - compile_variant reports the error
        return f"{id(variant)} {arch}"
    return repr((variant.kernel.__name__, arch, signature, sorted(constexprs.items()), sorted(attrs.items()),
                 sorted((k, repr(v)) for k, v in options.items())))


def compile_all(archs: list[int], jobs: int, only: list[str] | None = None) -> tuple[list[AotResult], list[str]]:
    """Compile every variant (or those whose label is one of `only`) for every arch, `jobs` at a
    time (ptxas is single-threaded), each distinct specialisation once."""
    variants, skipped = collect_variants()
    chosen = [i for i, v in enumerate(variants) if not only or v.label in only]
    tasks = [(index, arch) for arch in archs for index in chosen]
    keys = [_compile_key(variants[index], arch) for index, arch in tasks]
    first: dict[str, int] = {}
    for t, key in enumerate(keys):
        first.setdefault(key, t)
    unique = sorted(set(first.values()))
    if jobs <= 1 or len(unique) <= 1:
        compiled = [compile_variant(variants[tasks[t][0]], tasks[t][1]) for t in unique]
    else:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            compiled = list(pool.map(_compile_task, [tasks[t] for t in unique]))
    by_task = dict(zip(unique, compiled))
    results = []
    for t, (index, _) in enumerate(tasks):
        result = by_task[first[keys[t]]]
        variant = variants[index]
        if variant.launch is not None:  # same code, this launch's own label and geometry
            analysis = dict(result.analysis, launch=launch_geometry(variant.launch))
            result = dataclasses.replace(result, variant=variant.label, module=variant.module, analysis=analysis)
        results.append(result)
    return results, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vita_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="CUDA compute capabilities (90 80)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPUs)")
    parser.add_argument("--report", metavar="DIR", help="write report.md and report.json (first arch) to DIR")
    parser.add_argument("--only", nargs="+", metavar="LABEL",
                        help='only these variants, by label ("gate_up bf16 R=16")')
    args = parser.parse_args(argv)

    # @triton.jit returns an interpreter object when TRITON_INTERPRET is set at decoration time.
    os.environ.pop("TRITON_INTERPRET", None)
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        print("this Triton has no CUDA (nvidia) backend: cannot compile ahead of time", file=sys.stderr)
        return 2
    results, skipped = compile_all(args.arch, args.jobs, args.only)
    print(format_table(results))
    if skipped:
        print("\nskipped:")
        for line in skipped:
            print(f"- {line}")
    if args.report:
        first = [r for r in results if r.arch == args.arch[0]]
        for path in write_report(first, args.report):
            print(f"wrote {path}")
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results)} compiled for {', '.join(f'sm_{a}' for a in args.arch)}, {len(failed)} failed, "
          f"{len(skipped)} module(s) skipped")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
