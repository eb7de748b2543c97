"""Ahead-of-time compilation of every registered Triton kernel for sm_90 and sm_80, no GPU needed.

The compile runs in a subprocess without TRITON_INTERPRET (this process has the interpreter on
when there is no GPU, and @triton.jit decides at decoration time)."""
from __future__ import annotations

import json
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
    variants, skipped = aot.collect_variants()  # plans and signatures only; nothing compiles in this process
    assert len(rows) == len(variants) * len(ARCHS), report
    for arch in ARCHS:
        assert sum(f"| sm_{arch} |" in line for line in rows) == len(variants)
    triton_modules = {spec.ref.__module__ for spec in ops() if "triton" in spec.impls}
    assert not [line for line in skipped if line.split(":")[0] in triton_modules], skipped
    assert {v.module for v in variants} == triton_modules
    assert any(line.startswith("| _attention_kernel |") for line in rows)


def test_every_runtime_row_count_is_planned():
    """The AOT set holds every GEMV-family op at every row count the runtime launches at 7B."""
    labels = {v.label for v in aot.collect_variants()[0] if v.launch is not None}
    for op in ("o_proj", "down_proj", "k_proj", "gate_up", "mtp_input", "head_argmax", "head_logits"):
        for rows in (1, 2, 4, 11, 14, 16, 32, 40, 128):
            assert f"{op} bf16 R={rows}" in labels, (op, rows)


# One variant per GEMV-family op and row-block class (broadcast 1 and 2 rows; tl.dot blocks of
# 16 with split-K, 32, 64 and 128 rows), compiled for sm_90 with the JIT's specialisation.
GEMV_CHECKED = ([f"{op} bf16 R={rows}" for op in ("o_proj", "gate_up", "mtp_input", "head_argmax")
                 for rows in (1, 2, 11, 32, 40, 128)]
                + ["head_logits bf16 R=1", "down_proj bf16 R=11", "k_proj bf16 R=1", "o_proj fp16 R=1"])


@needs_cuda_backend
def test_gemv_variants_compile_without_spills_and_with_128_bit_weight_loads(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "vita_kernels.aot", "--arch", "90", "--report", str(tmp_path),
                           "--only", *GEMV_CHECKED], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert "not a measurement" in report["note"]
    gemv = [v for v in report["variants"] if v.get("gemv")]
    assert sorted(v["variant"] for v in gemv) == sorted(GEMV_CHECKED)
    for v in gemv:
        where = f"{v['variant']} ({v['kernel']})"
        assert v["spill_stack_bytes"] == 0, f"{where} spills {v['spill_stack_bytes']} bytes"
        assert v["ptx"]["weight_loads"] > 0 and v["ptx"]["weight_load_bits"] == [128], \
            f"{where}: weight loads of {v['ptx']['weight_load_bits']} bits"
        assert v["grid"][1] == 1, f"{where}: {v['grid'][1]} row blocks re-read the weights"
        if v["config"]["BLOCK_R"] < 16:  # the broadcast K loop has no cross-lane reduction
            assert v["ptx"]["shfl_in_loops"] == 0, where
        assert v["programs_per_sm"] >= 1 and not v["problems"], (where, v["problems"])
    # The JIT's specialisation, not a hand-written one: 1 becomes a constant, strides and
    # pointers divisible by 16 are declared so.
    one_row = next(v for v in gemv if v["variant"] == "o_proj bf16 R=1")
    assert one_row["specialised"]["constant"] == ["R"]
    assert {"x_ptr", "w_ptr", "stride_xr", "N"} <= set(one_row["specialised"]["divisible_by_16"])
    assert (tmp_path / "report.md").read_text().count("not a measurement") == 1


def test_ptx_analysis_finds_loops_widths_and_shuffles():
    ptx = "\n".join([
        "ld.global.L1::evict_first.L2::cache_hint.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ], %rd9;",
        "$L__BB0_1:",
        "ld.global.b32 { %r5 }, [ %rd2 + 0 ];",
        "cp.async.cg.shared.global.L2::cache_hint [ %r6 + 0 ], [ %rd3 + 0 ], 0x10, %r7, %rd9;",
        "shfl.sync.bfly.b32 %r8, %r9, 16, 31, -1;",
        "@%p1 bra $L__BB0_1;",
        "ld.global.L1::evict_first.L2::cache_hint.v2.b32 { %r1, %r2 }, [ %rd1 + 0 ], %rd9;",
        "shfl.sync.bfly.b32 %r8, %r9, 8, 31, -1;",
        "$L__BB0_2:",
        "@%p2 bra $L__BB0_3;",
    ])
    a = aot.ptx_analysis(ptx)
    assert a["weight_load_bits"] == [64, 128] and a["weight_loads"] == 3 and a["weight_loads_async"]
    assert (a["shfl_in_loops"], a["shfl_outside_loops"], a["other_loads_in_loops"]) == (1, 1, 1)


def test_occupancy_from_registers_and_shared_memory():
    assert aot.occupancy(128, 0, 4) == 4  # 64K registers / (128 x 128 threads)
    assert aot.occupancy(32, 0, 4) == 16  # 64 warps per SM
    assert aot.occupancy(40, 100 * 1024, 4) == 2  # 228 KB of shared memory


def test_interpreted_kernels_are_refused_with_a_reason():
    """Under TRITON_INTERPRET=1 the kernels are interpreter objects: compile_variant says so."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("this process compiles real kernels (TRITON_INTERPRET is not set)")
    variant = aot.collect_variants()[0][0]
    result = aot.compile_variant(variant, 90)
    assert not result.ok and "TRITON_INTERPRET" in result.error
