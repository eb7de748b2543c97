"""Ahead-of-time compilation of every registered Triton kernel for sm_90 and sm_80, no GPU needed.

The compile runs in a subprocess without TRITON_INTERPRET (this process has the interpreter on
when there is no GPU, and @triton.jit decides at decoration time)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton.backends

from vita_kernels import aot
from vita_kernels.registry import ops

REPO = Path(__file__).resolve().parents[1]
ARCHS = (90, 80)

needs_cuda_backend = pytest.mark.skipif("nvidia" not in triton.backends.backends,
                                        reason="this Triton build has no CUDA (nvidia) backend to compile for")


@needs_cuda_backend
def test_every_kernel_compiles_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    proc = subprocess.run([sys.executable, "-m", "vita_kernels.aot", "--arch", *map(str, ARCHS)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    report = proc.stdout + proc.stderr[-4000:]
    assert proc.returncode == 0, report
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| _")]
    assert rows and all("| ok |" in line for line in rows), report

    # As many rows as variants x archs, and every module that registers a Triton kernel listed
    # its variants (none skipped for lacking aot_variants()).
    variants, skipped = aot.collect_variants()  # signatures only; nothing compiles in this process
    assert len(rows) == len(variants) * len(ARCHS), report
    for arch in ARCHS:
        assert sum(f"| sm_{arch} |" in line for line in rows) == len(variants)
    triton_modules = {spec.ref.__module__ for spec in ops() if "triton" in spec.impls}
    assert not [line for line in skipped if line.split(":")[0] in triton_modules], skipped
    assert {module for module, _ in variants} == triton_modules
    assert any(line.startswith("| _attention_kernel |") for line in rows)


def test_interpreted_kernels_are_refused_with_a_reason():
    """Under TRITON_INTERPRET=1 the kernels are interpreter objects: compile_variant says so."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("this process compiles real kernels (TRITON_INTERPRET is not set)")
    module, variant = aot.collect_variants()[0][0]
    result = aot.compile_variant(module, variant, 90)
    assert not result.ok and "TRITON_INTERPRET" in result.error
