"""Attention input of a decoder layer: RMSNorm + QKV (with bias) + RoPE + KV-cache write."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vita_kernels.norm import rmsnorm_ref
from vita_kernels.registry import Case, Geometry, OpSpec, cache_position, norm_weight, randn, weight


def rope_tables(head_dim: int, theta: float, max_positions: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_positions, head_dim // 2] in fp32: cos(p * theta^(-2i/d)).

    Computed exactly as Qwen2's rotary embedding does (fp32 inverse frequencies, fp32 product).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.arange(max_positions, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return freqs.cos().contiguous(), freqs.sin().contiguous()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qkv_rope_cache_ref(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    w_qkv: torch.Tensor,
    b_qkv: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    rope_offset: int,
    num_heads: int,
    num_kv_heads: int,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q, k, v = split(rmsnorm(x) @ W_qkv^T + b); q, k = rope(q, k); cache[pos + r] = k, v.

    x: [R, H]; norm_weight: [H]; w_qkv: [(nq + 2 nkv) d, H] (q rows, then k, then v);
    b_qkv: [(nq + 2 nkv) d]; cos/sin_table: [P, d/2] fp32; k_cache, v_cache: [nkv, S, d]
    (written in place at slots pos..pos+R-1); pos: int64 tensor [1] on the device, the cache
    slot of row 0; the RoPE position of row r is pos + r + rope_offset. Returns q: [R, nq, d].
    RoPE follows Qwen2: cos/sin cast to the dtype, `q * cos + rotate_half(q) * sin` in dtype.
    """
    rows = x.shape[0]
    head_dim = k_cache.shape[-1]
    h = rmsnorm_ref(x, norm_weight, eps)
    qkv = F.linear(h, w_qkv, b_qkv)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.view(rows, num_heads, head_dim)
    k = k.view(rows, num_kv_heads, head_dim)
    v = v.view(rows, num_kv_heads, head_dim)
    slots = pos.reshape(1) + torch.arange(rows, device=x.device)
    rope_pos = slots + rope_offset
    cos = cos_table.index_select(0, rope_pos).repeat(1, 2).to(x.dtype)[:, None, :]
    sin = sin_table.index_select(0, rope_pos).repeat(1, 2).to(x.dtype)[:, None, :]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k_cache.index_copy_(1, slots, k.transpose(0, 1))
    v_cache.index_copy_(1, slots, v.transpose(0, 1))
    if out is not None:
        out.copy_(q)
        return out
    return q


def _cases(geom: Geometry, dtype, device, gen) -> list[Case]:
    cases = []
    h, d, nq, nkv = geom.hidden, geom.head_dim, geom.num_heads, geom.num_kv_heads
    n = (nq + 2 * nkv) * d
    cos, sin = rope_tables(d, geom.rope_theta, geom.cache_len + 16, device)
    for rows in geom.rows:
        for rope_offset in (0, 3):
            pos = cache_position(geom, rows)
            kw = dict(x=randn((rows, h), dtype, device, gen), norm_weight=norm_weight(h, dtype, device, gen),
                      w_qkv=weight((n, h), dtype, device, gen), b_qkv=randn((n,), dtype, device, gen, 0.5),
                      cos_table=cos, sin_table=sin,
                      k_cache=randn((nkv, geom.cache_len, d), dtype, device, gen),
                      v_cache=randn((nkv, geom.cache_len, d), dtype, device, gen),
                      pos=torch.tensor([pos], dtype=torch.int64, device=device), rope_offset=rope_offset,
                      num_heads=nq, num_kv_heads=nkv, eps=geom.eps)
            size = torch.finfo(dtype).bits // 8
            moved = size * (n * h + n + rows * h + h + rows * n) + 4 * rows * d
            cases.append(Case(f"R{rows}-pos{pos}-off{rope_offset}", kw, mutated=("k_cache", "v_cache"),
                              bytes_moved=moved))
    return cases


SPEC = OpSpec("qkv_rope_cache", qkv_rope_cache_ref, _cases)
