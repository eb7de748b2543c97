"""Batch-1 GEMV family: out = residual + (x @ W^T + bias), for R = 1..16 rows (and more)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from vita_kernels.registry import Case, Geometry, OpSpec, randn, weight


def linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = residual + (x @ W^T + bias).to(dtype); bias and residual optional.

    x: [R, K]; weight: [N, K]; bias: [N]; residual: [R, N]; all one dtype. Returns [R, N].
    The projection is rounded to the dtype before the residual add (as in Qwen2's
    `residual + o_proj(attn)`).
    """
    y = F.linear(x, weight, bias)
    if residual is not None:
        y = residual + y
    if out is not None:
        out.copy_(y)
        return out
    return y


def _cases(geom: Geometry, dtype, device, gen) -> list[Case]:
    """o_proj, down_proj (with residual) and a biased projection, at every row count."""
    cases = []
    shapes = [("o_proj", geom.num_heads * geom.head_dim, geom.hidden, False, True),
              ("down_proj", geom.intermediate, geom.hidden, False, True),
              ("bias_only", geom.hidden, geom.num_kv_heads * geom.head_dim, True, False)]
    for rows in geom.rows:
        for label, k, n, has_bias, has_res in shapes:
            kw = dict(x=randn((rows, k), dtype, device, gen), weight=weight((n, k), dtype, device, gen),
                      bias=randn((n,), dtype, device, gen) if has_bias else None,
                      residual=randn((rows, n), dtype, device, gen) if has_res else None)
            size = torch.finfo(dtype).bits // 8
            moved = size * (n * k + rows * k + rows * n * (2 if has_res else 1) + (n if has_bias else 0))
            cases.append(Case(f"{label}-R{rows}-{n}x{k}", kw, bytes_moved=moved))
    return cases


SPEC = OpSpec("linear", linear_ref, _cases)
