"""GQA causal attention of R new query rows over a static KV cache."""
from __future__ import annotations

import math

import torch
from vita_kernels.registry import Case, Geometry, OpSpec, cache_position, randn


def attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """o[r, h] = softmax(q[r, h] . K[g(h), :pos+r+1]^T / sqrt(d)) @ V[g(h), :pos+r+1], in fp32.

    q: [R, nq, d]; k_cache, v_cache: [nkv, S, d] already holding rows 0..pos+R-1;
    pos: int64 tensor [1], the cache slot of query row 0; g(h) = h // (nq / nkv).
    Returns [R, nq * d] in q's dtype. Slots past pos + r are masked, never read as data.
    """
    rows, num_heads, head_dim = q.shape
    num_kv_heads, max_len, _ = k_cache.shape
    group = num_heads // num_kv_heads
    k = k_cache.float().repeat_interleave(group, dim=0)  # [nq, S, d]
    v = v_cache.float().repeat_interleave(group, dim=0)
    scores = torch.einsum("rhd,hsd->hrs", q.float(), k) / math.sqrt(head_dim)
    limit = pos.reshape(1, 1) + torch.arange(rows, device=q.device)[:, None]  # [R, 1]
    visible = torch.arange(max_len, device=q.device)[None, :] <= limit  # [R, S]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    o = torch.einsum("hrs,hsd->rhd", scores.softmax(dim=-1), v)
    o = o.reshape(rows, num_heads * head_dim).to(q.dtype)
    if out is not None:
        out.copy_(o)
        return out
    return o


def _cases(geom: Geometry, dtype, device, gen) -> list[Case]:
    cases = []
    d, nq, nkv = geom.head_dim, geom.num_heads, geom.num_kv_heads
    for rows in geom.rows:
        for pos in sorted({0, cache_position(geom, rows)}):
            kw = dict(q=randn((rows, nq, d), dtype, device, gen),
                      k_cache=randn((nkv, geom.cache_len, d), dtype, device, gen),
                      v_cache=randn((nkv, geom.cache_len, d), dtype, device, gen),
                      pos=torch.tensor([pos], dtype=torch.int64, device=device))
            size = torch.finfo(dtype).bits // 8
            moved = size * (2 * nkv * (pos + rows) * d + 2 * rows * nq * d)
            cases.append(Case(f"R{rows}-pos{pos}", kw, bytes_moved=moved))
    return cases


SPEC = OpSpec("attention", attention_ref, _cases)
