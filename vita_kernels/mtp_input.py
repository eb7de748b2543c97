"""MCTP module input: embedding gather + both RMSNorms + the input projection.

u = W_proj @ concat(RMSNorm_emb(E[ids]), RMSNorm_hid(norm(v)))   (embedding half first)

`v` is the raw (pre-final-norm) output of the previous stage; the shared final norm is applied
here, in the consumer, so no stage has to write a normalised copy of every row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vita_kernels.norm import rmsnorm_ref
from vita_kernels.registry import Case, Geometry, OpSpec, norm_weight, randn, weight


def mtp_input_ref(
    ids: torch.Tensor,
    embed: torch.Tensor,
    hidden: torch.Tensor,
    final_norm_weight: torch.Tensor,
    emb_norm_weight: torch.Tensor,
    hid_norm_weight: torch.Tensor,
    w_proj: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """u = W_proj @ [rmsnorm(E[ids], w_emb) ; rmsnorm(rmsnorm(hidden, w_final), w_hid)].

    ids: [R] int64 in [0, V); embed: [V, H]; hidden: [R, H] raw previous-stage output;
    norm weights: [H]; w_proj: [H, 2H]. Returns [R, H] in the model dtype.
    """
    e = rmsnorm_ref(embed.index_select(0, ids), emb_norm_weight, eps)
    h = rmsnorm_ref(rmsnorm_ref(hidden, final_norm_weight, eps), hid_norm_weight, eps)
    u = F.linear(torch.cat([e, h], dim=-1), w_proj)
    if out is not None:
        out.copy_(u)
        return out
    return u


def _cases(geom: Geometry, dtype, device, gen) -> list[Case]:
    cases = []
    h = geom.hidden
    for rows in geom.rows:
        kw = dict(ids=torch.randint(0, geom.vocab, (rows,), generator=gen).to(device),
                  embed=randn((geom.vocab, h), dtype, device, gen),
                  hidden=randn((rows, h), dtype, device, gen, scale=3.0),
                  final_norm_weight=norm_weight(h, dtype, device, gen),
                  emb_norm_weight=norm_weight(h, dtype, device, gen),
                  hid_norm_weight=norm_weight(h, dtype, device, gen),
                  w_proj=weight((h, 2 * h), dtype, device, gen), eps=geom.eps)
        size = torch.finfo(dtype).bits // 8
        moved = size * (2 * h * h + 3 * rows * h + 3 * h) + 8 * rows
        cases.append(Case(f"R{rows}-H{h}", kw, bytes_moved=moved))
    return cases


SPEC = OpSpec("mtp_input", mtp_input_ref, _cases)
