#!/usr/bin/env python3
"""Compile-check the CUDA sources without a GPU: every csrc/*.cu for sm_90 and sm_80.

    python scripts/check_cuda_compile.py [--archs 90,80] [--allow-warnings] [--no-bindings]

Each .cu is compiled on its own with `nvcc -c -std=c++17 -arch=sm_XX`, host warnings on,
ptxas reporting spills and local memory; any error (and, unless --allow-warnings, any
warning) fails the check. The register/spill summary of every kernel is printed from
`--resource-usage`. csrc/bindings.cpp is then syntax-checked against the installed torch's
headers where torch is importable (a CPU wheel lacks one generated CUDA header, which is
stubbed for the check). Exit status 0 only when everything passed.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
WARNING = re.compile(r"\bwarning\b", re.IGNORECASE)


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def cuda_include_dir(nvcc: str) -> str:
    """The toolkit's include directory, as nvcc itself reports it (nvcc may be a wrapper script)."""
    proc = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                          capture_output=True, text=True)
    if m := re.search(r'INCLUDES="-I([^"]+)"', proc.stdout + proc.stderr):
        return m.group(1).strip()
    return str(Path(nvcc).resolve().parent.parent / "include")


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def compile_one(nvcc: str, source: Path, arch: int, workdir: Path) -> tuple[Path, int, int, str]:
    cmd = [nvcc, "-c", "-std=c++17", f"-arch=sm_{arch}", "-O3", "-lineinfo", "--resource-usage",
           "-Xptxas", "-warn-spills,-warn-lmem-usage", "-Xcompiler", "-Wall,-Wextra",
           "-I", str(CSRC), "-o", str(workdir / f"{source.stem}.sm_{arch}.o"), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return source, arch, proc.returncode, proc.stdout + proc.stderr


def parse_resources(log: str) -> list[tuple[str, int, int, int]]:
    """(kernel, registers, spill store bytes, stack bytes) per compiled entry function."""
    rows, name, spill, stack = [], None, 0, 0
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            name = m.group(1)
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            stack, spill = int(m.group(1)), int(m.group(2)) + int(m.group(3))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            rows.append((name, int(m.group(1)), spill, stack))
            name = None
    return rows


def check_bindings(workdir: Path) -> tuple[bool, str]:
    """Syntax-check bindings.cpp with the installed torch's headers (None-result when no torch)."""
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import include_paths
    except ImportError as exc:
        return True, f"skipped bindings.cpp: torch not importable ({exc})"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    nvcc = find_nvcc()
    if not cxx or not nvcc:
        return True, "skipped bindings.cpp: no host C++ compiler or nvcc"
    includes = list(include_paths())
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes):
        stub = workdir / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")  # generated only in CUDA builds of torch
        includes.insert(0, str(workdir / "stub"))
    includes += [cuda_include_dir(nvcc), sysconfig.get_paths()["include"]]
    results = []
    for std in ("c++17", "c++20"):  # torch 2.11 builds extensions as C++17, newer torch as C++20
        cmd = [cxx, f"-std={std}", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-I", str(CSRC)]
        cmd += [arg for p in includes for arg in ("-isystem", p)] + [str(CSRC / "bindings.cpp")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return False, f"bindings.cpp ({std}) FAILED:\n{proc.stdout}{proc.stderr}"
        results.append(std)
    return True, f"bindings.cpp syntax-checked against torch headers ({', '.join(results)}): ok"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="90,80", help="comma-separated SM versions (default 90,80)")
    parser.add_argument("--allow-warnings", action="store_true", help="report warnings without failing")
    parser.add_argument("--no-bindings", action="store_true", help="skip the bindings.cpp syntax check")
    args = parser.parse_args()

    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (set NVCC or CUDA_HOME, or put it on PATH)", file=sys.stderr)
        return 2
    sources = sorted(CSRC.glob("*.cu"))
    if not sources:
        print(f"no .cu files under {CSRC}", file=sys.stderr)
        return 2
    archs = [int(a) for a in args.archs.split(",") if a.strip()]

    failed = False
    with tempfile.TemporaryDirectory(prefix="vk_nvcc_") as tmp:
        workdir = Path(tmp)
        jobs = [(s, a) for s in sources for a in archs]
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            results = list(pool.map(lambda job: compile_one(nvcc, job[0], job[1], workdir), jobs))

        table = []
        for source, arch, rc, log in results:
            warnings = [line for line in log.splitlines() if WARNING.search(line)]
            status = "ok"
            if rc != 0:
                status, failed = "ERROR", True
            elif warnings:
                status = "warnings" if args.allow_warnings else "FAILED (warnings)"
                failed = failed or not args.allow_warnings
            print(f"{source.name:<14} sm_{arch}: {status}")
            if rc != 0 or warnings:
                print("\n".join("    " + line for line in log.splitlines() if line.strip()
                                and not line.startswith("ptxas info")))
            table += [(source.name, arch, *row) for row in parse_resources(log)]

        names = demangle(sorted({row[2] for row in table}))
        print("\n| file | arch | kernel | registers | spill bytes | stack bytes |\n|---|---|---|---|---|---|")
        for file, arch, kernel, regs, spill, stack in table:
            short = re.sub(r"\s+", " ", names[kernel].replace("vk::", "").replace("(anonymous namespace)::", ""))
            print(f"| {file} | sm_{arch} | `{short}` | {regs} | {spill} | {stack} |")
            if spill:
                failed = True
                print(f"    ^ spills registers to local memory", file=sys.stderr)

        if not args.no_bindings:
            ok, message = check_bindings(workdir)
            print("\n" + message)
            failed = failed or not ok

    print("\nFAILED" if failed else "\nall CUDA sources compile cleanly")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
