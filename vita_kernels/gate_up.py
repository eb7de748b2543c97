"""MLP input of a decoder layer: RMSNorm + gate/up projections + SiLU(gate) * up in one pass."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vita_kernels.norm import rmsnorm_ref
from vita_kernels.registry import Case, Geometry, OpSpec, norm_weight, randn, weight


def norm_gate_up_ref(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = silu(h @ W_gate^T) * (h @ W_up^T), h = rmsnorm(x); each product rounded to dtype.

    x: [R, H]; norm_weight: [H]; w_gate_up: [2I, H] (gate rows first, then up rows).
    Returns [R, I].
    """
    h = rmsnorm_ref(x, norm_weight, eps)
    gate, up = F.linear(h, w_gate_up).chunk(2, dim=-1)
    y = F.silu(gate) * up
    if out is not None:
        out.copy_(y)
        return out
    return y


def _cases(geom: Geometry, dtype, device, gen) -> list[Case]:
    cases = []
    h, i = geom.hidden, geom.intermediate
    for rows in geom.rows:
        kw = dict(x=randn((rows, h), dtype, device, gen), norm_weight=norm_weight(h, dtype, device, gen),
                  w_gate_up=weight((2 * i, h), dtype, device, gen), eps=geom.eps)
        size = torch.finfo(dtype).bits // 8
        cases.append(Case(f"R{rows}-{2 * i}x{h}", kw, bytes_moved=size * (2 * i * h + rows * h + h + rows * i)))
    return cases


SPEC = OpSpec("norm_gate_up", norm_gate_up_ref, _cases)
