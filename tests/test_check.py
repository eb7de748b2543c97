"""The comparison rules of `vita_kernels.check` catch what they claim to: wrong values, NaN,
an ignored out=, stray writes to inputs, missed in-place writes, a wrong argmax; and the CLI
reports and exits accordingly."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE

from vita_kernels import check
from vita_kernels.attention import attention_ref
from vita_kernels.head import head_logits_ref
from vita_kernels.qkv_rope import qkv_rope_cache_ref
from vita_kernels.registry import GEOMETRIES, get_op

TINY = GEOMETRIES["tiny"]


def _with_impl(op_name: str, fn):
    return dataclasses.replace(get_op(op_name), impls={"fake": fn})


def _notes(results):
    return " ".join(r.note for r in results)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_the_reference_itself_passes(dtype):
    results = check.compare_impl(_with_impl("attention", attention_ref), "fake", TINY, dtype, DEVICE)
    assert results and all(r.passed for r in results), check.format_table(results)


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-3), (torch.bfloat16, 4 * 2.0**-7)],
                         ids=["fp32-1e-3", "bf16-4ulp"])
def test_slightly_off_fails(dtype, rel):
    def off(q, k_cache, v_cache, cache_rows, positions, out=None, **kw):
        o = attention_ref(q, k_cache, v_cache, cache_rows, positions, **kw)
        o = (o.float() * (1 + rel)).to(dtype)
        return out.copy_(o) if out is not None else o

    results = check.compare_impl(_with_impl("attention", off), "fake", TINY, dtype, DEVICE, case_names=["R11-pos37"])
    assert not any(r.passed for r in results), check.format_table(results)


def test_nan_and_ignored_out_fail():
    def nan(q, k_cache, v_cache, cache_rows, positions, out=None, **kw):
        o = attention_ref(q, k_cache, v_cache, cache_rows, positions, **kw)
        o[0, 0] = float("nan")
        return out.copy_(o) if out is not None else o

    def ignores_out(q, k_cache, v_cache, cache_rows, positions, out=None, **kw):
        return attention_ref(q, k_cache, v_cache, cache_rows, positions, **kw)

    results = check.compare_impl(_with_impl("attention", nan), "fake", TINY, torch.float32, DEVICE,
                                 case_names=["R3-pos14"])
    assert not any(r.passed for r in results) and "NaN" in _notes(results)
    results = check.compare_impl(_with_impl("attention", ignores_out), "fake", TINY, torch.float32, DEVICE,
                                 case_names=["R3-pos14"])
    given = [r for r in results if r.out_given]
    assert given and not any(r.passed for r in given) and "did not return the out= tensor" in _notes(given)
    assert all(r.passed for r in results if not r.out_given)


def test_writing_an_input_fails():
    def scribbles(q, k_cache, v_cache, cache_rows, positions, out=None, **kw):
        o = attention_ref(q, k_cache, v_cache, cache_rows, positions, out, **kw)
        q.zero_()
        return o

    results = check.compare_impl(_with_impl("attention", scribbles), "fake", TINY, torch.float32, DEVICE,
                                 case_names=["R1-pos8"], out_modes=(False,))
    assert any(not r.passed and "wrote to its input 'q'" in r.note for r in results), check.format_table(results)


def test_missing_in_place_cache_write_fails():
    def forgets_cache(**kw):
        kw["k_cache"] = kw["k_cache"].clone()
        return qkv_rope_cache_ref(**kw)

    results = check.compare_impl(_with_impl("qkv_rope_cache", forgets_cache), "fake", TINY, torch.float32, DEVICE,
                                 case_names=["R3-pos14-off0"], out_modes=(False,))
    by_output = {r.output: r.passed for r in results}
    assert by_output == {"out": True, "k_cache": False, "v_cache": True}, check.format_table(results)


def test_argmax_rule():
    def argmin(x, norm_weight, w_head, eps, out=None):
        ids = head_logits_ref(x, norm_weight, w_head, eps).argmin(dim=-1)
        return out.copy_(ids) if out is not None else ids

    spec = get_op("head_argmax")
    results = check.compare_impl(_with_impl("head_argmax", spec.ref), "fake", TINY, torch.bfloat16, DEVICE)
    assert results and all(r.passed for r in results), check.format_table(results)
    results = check.compare_impl(_with_impl("head_argmax", argmin), "fake", TINY, torch.bfloat16, DEVICE)
    assert results and not any(r.passed for r in results), check.format_table(results)


def test_cli_exit_status_and_table(monkeypatch, capsys):
    import vita_kernels.registry as registry

    def broken(q, k_cache, v_cache, cache_rows, positions, out=None, **kw):
        return attention_ref(q, k_cache, v_cache, cache_rows, positions, out, **kw).mul_(2)

    broken_spec, good_spec = _with_impl("attention", broken), _with_impl("attention", attention_ref)
    monkeypatch.setattr(registry, "ops", lambda: [broken_spec])
    assert check.main(["--device", DEVICE.type, "--ops", "attention", "--dtype", "fp32", "--impl", "fake"]) == 1
    assert "| attention | fake | R1-pos0 | fp32 |" in capsys.readouterr().out
    monkeypatch.setattr(registry, "ops", lambda: [good_spec])
    assert check.main(["--device", DEVICE.type, "--ops", "attention", "--dtype", "fp32", "--impl", "fake"]) == 0
    assert "0 failed" in capsys.readouterr().out


def test_cli_runs_the_triton_kernels_in_a_fresh_process():
    """`python -m vita_kernels.check` sets up the interpreter itself on the CPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "vita_kernels.check", "--device", DEVICE.type, "--ops", "attention",
                           "--dtype", "bf16", "--impl", "triton"], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("| attention | triton |") == 18  # 9 cases x (out= given, none)
    assert "18 comparisons" in proc.stdout and "0 failed" in proc.stdout
