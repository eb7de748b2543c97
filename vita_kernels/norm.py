"""RMSNorm: the reference every fused prologue reproduces, and the fused (add +) RMSNorm op.

Qwen2's RMSNorm computes in fp32 and rounds twice: `w * (x * rsqrt(mean(x^2) + eps)).to(dtype)`.
The fused kernels reproduce exactly that rounding sequence so that bf16 results match the
reference bit for bit whenever the fp32 reductions agree.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vita_kernels import _tl
from vita_kernels.registry import GEOMETRIES, Case, Geometry, OpSpec, norm_weight, randn


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype), statistics in fp32.

    x: [..., H] (fp32/bf16/fp16); weight: [H], same dtype. Returns x's dtype.
    """
    dtype = x.dtype
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(dtype)


def add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual (in x's dtype, or s = x without residual); y = rmsnorm(s). Returns (y, s).

    x, residual: [R, H]; weight: [H]. This is the decoder layer's "residual add, then next norm".
    """
    s = x if residual is None else x + residual
    return rmsnorm_ref(s, weight, eps), s


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, s_ptr, eps, stride_xr, stride_rr, stride_yr, stride_sr,
                        H: tl.constexpr, HAS_RESIDUAL: tl.constexpr, WRITE_SUM: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    """One program per row, the whole row in registers (H <= BLOCK_H).

    Traffic: x (+ residual) read once, y (+ s) written once, the norm weight from L2: the
    floor. At 7B this is 14-57 KB per row, so the launch latency dominates, not bandwidth.
    """
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    dtype: tl.constexpr = y_ptr.dtype.element_ty
    s = tl.load(x_ptr + row * stride_xr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # x + residual, rounded to the dtype as the reference's add
        res = tl.load(res_ptr + row * stride_rr + cols, mask=mask, other=0.0).to(tl.float32)
        s = _tl.round_to(s + res, dtype)
    if WRITE_SUM:
        tl.store(s_ptr + row * stride_sr + cols, s, mask=mask)
    rstd = tl.rsqrt(tl.sum(s * s, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_yr + cols, _tl.apply_rmsnorm(s, rstd, w, dtype), mask=mask)


def _config(hidden: int, has_residual: bool, write_sum: bool) -> dict:
    return dict(H=hidden, HAS_RESIDUAL=has_residual, WRITE_SUM=write_sum, BLOCK_H=triton.next_power_of_2(hidden))


def add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual (or s = x); y = rmsnorm(s): the fused Triton op (= add_rmsnorm_ref). Returns (y, s).

    x, residual: [R, H]; weight: [H] contiguous; one dtype. `out` receives y and
    `residual_out` receives s (without residual and without residual_out, s is x itself, as in
    the reference). Grid: one program per row (H <= 65536).
    """
    dtype = _tl.model_dtype("x", x)
    dev = x.device
    _tl.expect("weight", weight, ["H"], dtype, dev, contiguous=True)
    hidden = weight.shape[0]
    _tl.expect("x", x, ["R", hidden], dtype, dev)
    rows = x.shape[0]
    if residual is not None:
        _tl.expect("residual", residual, [rows, hidden], dtype, dev)
        residual = _tl.unit_stride(residual)
    if hidden > 65536:
        raise ValueError(f"weight has {hidden} elements, expected at most 65536 (one row per program)")
    if out is None:
        out = torch.empty((rows, hidden), dtype=dtype, device=dev)
    else:
        _tl.expect_out("out", out, [rows, hidden], dtype, dev)
    write_sum = residual is not None or residual_out is not None
    if residual_out is None:
        residual_out = torch.empty((rows, hidden), dtype=dtype, device=dev) if residual is not None else x
    else:
        _tl.expect_out("residual_out", residual_out, [rows, hidden], dtype, dev)
    if rows == 0 or hidden == 0:
        return out, residual_out
    x = _tl.unit_stride(x)
    _add_rmsnorm_kernel[(rows,)](x, residual if residual is not None else x, weight, out, residual_out, float(eps),
                                 x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
                                 residual_out.stride(0), **_config(hidden, residual is not None, write_sum),
                                 num_warps=_tl.NUM_WARPS)
    return out, residual_out


def aot_variants() -> list[tuple]:
    """(kernel, signature, constexprs) at H = 3584: with and without residual (bf16), fp16 once."""
    hidden = GEOMETRIES["7b"].hidden
    variants = []
    for dtype, flags in ((torch.bfloat16, ((True, True), (False, False))), (torch.float16, ((True, True),))):
        ptr = "*" + _tl.triton_type(dtype)
        types = dict(x_ptr=ptr, res_ptr=ptr, w_ptr=ptr, y_ptr=ptr, s_ptr=ptr, eps="fp32")
        for has_residual, write_sum in flags:
            constexprs = _config(hidden, has_residual, write_sum)
            variants.append((_add_rmsnorm_kernel, _tl.aot_signature(_add_rmsnorm_kernel, types, constexprs),
                             constexprs))
    return variants


def _cases(geom: Geometry, dtype, device, gen) -> list[Case]:
    cases = []
    h = geom.hidden
    for rows in geom.rows:
        for with_residual in (True, False):
            kw = dict(x=randn((rows, h), dtype, device, gen),
                      residual=randn((rows, h), dtype, device, gen) if with_residual else None,
                      weight=norm_weight(h, dtype, device, gen), eps=geom.eps)
            size = torch.finfo(dtype).bits // 8
            moved = size * (rows * h * (4 if with_residual else 2) + h)
            cases.append(Case(f"R{rows}-H{h}-{'add' if with_residual else 'noadd'}", kw, bytes_moved=moved))
    return cases


SPEC = OpSpec("add_rmsnorm", add_rmsnorm_ref, _cases, impls={"triton": add_rmsnorm})
