"""Output head: shared final RMSNorm + full-vocabulary GEMV, fused with greedy argmax."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vita_kernels.norm import rmsnorm_ref
from vita_kernels.registry import Case, Geometry, OpSpec, norm_weight, randn, weight


def head_logits_ref(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    w_head: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits = (rmsnorm(x) @ W_head^T).to(dtype).float().

    x: [R, H] raw final hidden rows; norm_weight: [H]; w_head: [V, H]. Returns [R, V] fp32
    whose values are those of the model dtype (as Hugging Face generation sees them).
    """
    logits = F.linear(rmsnorm_ref(x, norm_weight, eps), w_head).float()
    if out is not None:
        out.copy_(logits)
        return out
    return logits


def head_argmax_ref(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    w_head: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """ids = argmax(head_logits(x)), the lowest id among equal maxima. Returns [R] int64."""
    ids = head_logits_ref(x, norm_weight, w_head, eps).argmax(dim=-1)
    if out is not None:
        out.copy_(ids)
        return out
    return ids


def _cases(geom: Geometry, dtype, device, gen) -> list[Case]:
    cases = []
    h, v = geom.hidden, geom.vocab
    for rows in sorted({1, min(geom.rows[-1], 3)}):
        kw = dict(x=randn((rows, h), dtype, device, gen, scale=2.0), norm_weight=norm_weight(h, dtype, device, gen),
                  w_head=weight((v, h), dtype, device, gen), eps=geom.eps)
        size = torch.finfo(dtype).bits // 8
        cases.append(Case(f"R{rows}-V{v}", kw, bytes_moved=size * (v * h + rows * h + h) + 8 * rows))
    return cases


SPEC_ARGMAX = OpSpec("head_argmax", head_argmax_ref, _cases, compare="argmax")
SPEC_LOGITS = OpSpec("head_logits", head_logits_ref, _cases)
