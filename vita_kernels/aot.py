"""Compile every registered Triton kernel ahead of time for a CUDA architecture, without a GPU.

    python -m vita_kernels.aot [--arch 90 80]

Each op module lists its launches in `aot_variants()`: tuples (jit kernel, signature, constexprs)
or (jit kernel, signature, constexprs, options), where `signature` maps every argument name to
its Triton type ("*bf16", "i32", "fp32", "constexpr" for the constexprs) and `options` holds
compile options such as num_warps / num_stages. Each variant is compiled with

    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32), options)

(the same API in Triton 3.6 and 3.9), and the table reports the cubin size, registers per
thread and the stack frame (spilled registers live there) read from the cubin with cuobjdump.
Exits non-zero if any variant fails to compile. The kernels must be real @triton.jit
functions, so TRITON_INTERPRET is removed from this process's environment before the op
modules are imported.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass


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


def collect_variants() -> tuple[list[tuple[str, tuple]], list[str]]:
    """[(module name, variant tuple)] from every registered op's module, and the modules skipped."""
    from vita_kernels.registry import ops

    modules: list[str] = []
    for spec in ops():
        name = spec.ref.__module__
        if name not in modules:
            modules.append(name)
    variants, skipped = [], []
    for name in modules:
        module = importlib.import_module(name)
        fn = getattr(module, "aot_variants", None)
        if fn is None:
            skipped.append(f"{name}: no aot_variants() (no Triton kernel registered yet)")
            continue
        for variant in fn():
            variants.append((name, tuple(variant)))
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
    """`ASTSource(..., attrs=)` declaring every pointer argument 16-byte aligned, as the JIT
    specialises for torch allocations: without it AOT builds cannot vectorise weight loads."""
    return {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}


def compile_variant(module: str, variant: tuple, arch: int) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    kernel, signature, constexprs = variant[:3]
    from vita_kernels import _tl

    # The launchers' own warp count unless the variant names one, so AOT builds match JIT launches.
    options = {"num_warps": _tl.NUM_WARPS, **(dict(variant[3]) if len(variant) > 3 and variant[3] else {})}
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", repr(kernel))
    result = AotResult(module, name, describe(signature, constexprs, options), arch, ok=False)
    if not isinstance(kernel, JITFunction):
        result.error = (f"{name} is a {type(kernel).__name__}, not a JITFunction: it was created under "
                        "TRITON_INTERPRET=1; run the AOT compile in a fresh process")
        return result
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                                    attrs=pointer_alignment_attrs(signature)),
                                  target=GPUTarget("cuda", arch, 32), options=options)
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
    result.stack_bytes = usage.get("STACK")
    result.shared_bytes = getattr(compiled.metadata, "shared", None)
    return result


_VARIANTS: list[tuple[str, tuple]] | None = None


def _compile_task(task: tuple[int, int]) -> AotResult:
    """Worker entry: compile variant `index` of collect_variants() for `arch` (forked workers
    inherit the parent's imported modules; they re-list the variants, which is cheap)."""
    global _VARIANTS
    if _VARIANTS is None:
        _VARIANTS = collect_variants()[0]
    index, arch = task
    module, variant = _VARIANTS[index]
    return compile_variant(module, variant, arch)


def compile_all(archs: list[int], jobs: int) -> tuple[list[AotResult], list[str]]:
    """Compile every variant for every arch, `jobs` at a time (ptxas is single-threaded)."""
    variants, skipped = collect_variants()
    tasks = [(index, arch) for arch in archs for index in range(len(variants))]
    if jobs <= 1 or len(tasks) <= 1:
        return [compile_variant(*variants[index], arch) for index, arch in tasks], skipped
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_task, tasks)), skipped


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vita_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="CUDA compute capabilities (90 80)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPUs)")
    args = parser.parse_args(argv)

    # @triton.jit returns an interpreter object when TRITON_INTERPRET is set at decoration time.
    os.environ.pop("TRITON_INTERPRET", None)
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        print("this Triton has no CUDA (nvidia) backend: cannot compile ahead of time", file=sys.stderr)
        return 2
    results, skipped = compile_all(args.arch, args.jobs)
    print(format_table(results))
    if skipped:
        print("\nskipped:")
        for line in skipped:
            print(f"- {line}")
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results)} compiled for {', '.join(f'sm_{a}' for a in args.arch)}, {len(failed)} failed, "
          f"{len(skipped)} module(s) skipped")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
