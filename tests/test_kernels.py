"""Every registered op x implementation against its reference, driven by the registry.

CPU: GEOMETRIES["tiny"] through the Triton interpreter, fp32/bf16/fp16, every case, with `out=`
given (poisoned) and not. GPU: the same at tiny shapes, plus the 7B geometry in bf16.
New implementations are picked up from `spec.impls` automatically. The comparison rules live in
`vita_kernels.check.compare_impl` (shared with `python -m vita_kernels.check`).
"""
from __future__ import annotations

import inspect

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, TOLERANCES

from vita_kernels.check import DTYPE_NAMES, FP32_TOLERANCE, compare_impl, format_table, impl_skip_reason
from vita_kernels.registry import GEOMETRIES, ops

TINY = GEOMETRIES["tiny"]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _takes_out(spec) -> bool:
    return "out" in inspect.signature(spec.ref).parameters


def _tiny_params():
    params = []
    for spec in ops():
        case_names = [c.name for c in spec.cases(TINY, torch.float32, torch.device("cpu"), torch.Generator())]
        out_modes = (True, False) if _takes_out(spec) else (False,)
        for impl in spec.impls:
            for dtype in DTYPES:
                for case in case_names:
                    for out_given in out_modes:
                        test_id = f"{spec.name}-{impl}-{DTYPE_NAMES[dtype]}-{case}-{'out' if out_given else 'noout'}"
                        params.append(pytest.param(spec, impl, dtype, case, out_given, id=test_id))
    return params


def _impl_params():
    return [pytest.param(spec, impl, id=f"{spec.name}-{impl}") for spec in ops() for impl in spec.impls]


def _run(spec, impl, geom, dtype, **kw):
    reason = impl_skip_reason(impl, DEVICE, dtype)
    if reason:
        pytest.skip(reason)
    results = compare_impl(spec, impl, geom, dtype, DEVICE, **kw)
    assert results, "no comparison ran"
    assert all(r.passed for r in results), "\n" + format_table(results)
    return results


def test_check_tolerances_match_conftest():
    """check.py's fp32 tolerance is the fp32 row of the conftest table for this machine."""
    assert FP32_TOLERANCE["cuda" if HAS_CUDA else "cpu"] == TOLERANCES[torch.float32]


def test_every_op_has_an_implementation():
    """The registry-driven tests below cover something for every op (fails if an op loses its impls)."""
    missing = [spec.name for spec in ops() if not spec.impls]
    assert not missing, f"ops without any implementation: {missing}"


@pytest.mark.parametrize("spec, impl, dtype, case, out_given", _tiny_params())
def test_tiny(spec, impl, dtype, case, out_given):
    _run(spec, impl, TINY, dtype, case_names=[case], out_modes=(out_given,))


@pytest.mark.parametrize("spec, impl", _impl_params())
def test_tiny_noncontiguous(spec, impl):
    """Every tensor argument (and out=) in a strided layout: the launcher either handles it or
    refuses with a ValueError that names the argument. fp32, so a stride bug cannot hide."""
    _run(spec, impl, TINY, torch.float32, out_modes=(True,) if _takes_out(spec) else (False,), noncontiguous=True)


@pytest.mark.gpu
@pytest.mark.parametrize("spec, impl", _impl_params())
def test_7b_bf16(spec, impl):
    """The released 7B geometry in bf16, every case, out= given and not (GPU only)."""
    _run(spec, impl, GEOMETRIES["7b"], torch.bfloat16)
