"""RMSNorm: the reference every fused prologue reproduces, and the fused (add +) RMSNorm op.

Qwen2's RMSNorm computes in fp32 and rounds twice: `w * (x * rsqrt(mean(x^2) + eps)).to(dtype)`.
The fused kernels reproduce exactly that rounding sequence so that bf16 results match the
reference bit for bit whenever the fp32 reductions agree.
"""
from __future__ import annotations

import torch
from vita_kernels.registry import Case, Geometry, OpSpec, norm_weight, randn


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


SPEC = OpSpec("add_rmsnorm", add_rmsnorm_ref, _cases)
