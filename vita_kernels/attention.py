"""GQA causal attention of R new query rows over a static KV cache."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vita_kernels import _tl
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
    # Query heads of one KV head side by side: [nkv, group * R, d] against [nkv, S, d].
    qg = q.float().view(rows, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(num_kv_heads, -1, head_dim)
    scores = torch.matmul(qg, k_cache.float().transpose(1, 2)) / math.sqrt(head_dim)  # [nkv, group*R, S]
    limit = pos.reshape(1, 1) + torch.arange(rows, device=q.device)[:, None]  # [R, 1]
    visible = torch.arange(max_len, device=q.device)[None, :] <= limit  # [R, S]
    scores = scores.view(num_kv_heads, group, rows, max_len).masked_fill(~visible, float("-inf"))
    o = torch.matmul(scores.softmax(dim=-1).view(num_kv_heads, group * rows, max_len), v_cache.float())
    o = o.view(num_kv_heads, group, rows, head_dim).permute(2, 0, 1, 3).reshape(rows, num_heads * head_dim).to(q.dtype)
    if out is not None:
        out.copy_(o)
        return out
    return o


# --------------------------------------------------------------------------------------------
# Triton kernel
#
# One program owns BLOCK_R query rows of HEADS query heads that share one KV head; its tile of
# BLOCK_M = BLOCK_R * HEADS_P "query rows" is (row, head) pairs, row-major, so one K/V block
# load serves every head of the group (GQA grouping: the cache is read once per program, not
# once per query head). It walks the KV cache in BLOCK_N slots up to the last slot its last
# row can see, pos + min(R, row block end) - 1, with pos loaded on the device: the grid depends
# on R only, so a launch is CUDA-graph capturable for a fixed R and any pos.
#
# Memory traffic: K and V are read once per program for slots 0..pos+R-1 (2 * nkv * (pos+R) * d
# elements from HBM when HEADS = GROUP; with HEADS = 1 the other heads of a group re-read the same
# blocks, which then come from L2), q and o once each. At batch 1 the cache is small (512 slots x
# 4 heads x 128 x 2 B x 2 = 1 MB at 7B) next to a layer's 466 MB of weights, so attention is far
# from the step's floor either way; what matters at decode is latency, hence the launch policy in
# `_launch_config`.
#
# Numerics: scores and the online softmax in fp32, in the exp2 domain (scores times log2(e)/sqrt(d)).
# Loads are cast to fp32 right after tl.load (required by the CPU interpreter). On a GPU the
# fp32 dots run as TF32 for bf16/fp16 inputs: bf16 (8-bit) and fp16 (11-bit) significands are
# exact in TF32, so the q.K^T products are exact (accumulated in fp32) and only P (in [0, 1]) is
# rounded, to TF32's 11 bits, before P @ V: finer than flash-attention's bf16 P. fp32 inputs use
# IEEE fp32 dots.
# --------------------------------------------------------------------------------------------


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr,
    rows, max_len,
    stride_qr, stride_qh, stride_qd,
    stride_kh, stride_ks, stride_kd,
    stride_vh, stride_vs, stride_vd,
    stride_or, stride_oc,
    qk_scale,  # log2(e) / sqrt(d): scores in the exp2 domain
    GROUP: tl.constexpr,  # query heads per KV head
    HEADS: tl.constexpr,  # query heads per program: 1 or GROUP
    HEADS_P: tl.constexpr,  # HEADS rounded up to a power of two
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for fp32 inputs, "tf32" otherwise
):
    BLOCK_M: tl.constexpr = BLOCK_R * HEADS_P
    CHUNKS: tl.constexpr = GROUP // HEADS
    pid_h = tl.program_id(0)  # kv_head * CHUNKS + chunk
    pid_r = tl.program_id(1)
    kv_head = pid_h // CHUNKS

    m = tl.arange(0, BLOCK_M)
    row = pid_r * BLOCK_R + m // HEADS_P
    head = pid_h * HEADS + m % HEADS_P  # query head: kv_head * GROUP + chunk * HEADS + i
    m_valid = (row < rows) & (m % HEADS_P < HEADS)
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM

    pos = tl.load(pos_ptr)  # int64 cache slot of query row 0
    limit = pos + row  # the last slot each tile row sees (padding rows see a harmless prefix)
    kv_end = pos + tl.minimum(rows, (pid_r + 1) * BLOCK_R)  # one past the last slot any row sees
    kv_end = tl.minimum(kv_end, max_len)

    q = tl.load(q_ptr + row[:, None] * stride_qr + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)

    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Slot 0 is in the first block and visible to every tile row, so m_i is finite after the
    # first iteration and no row ever computes exp2(-inf - -inf).
    for start in range(0, kv_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_valid = n < kv_end
        k = tl.load(k_base + n[None, :] * stride_ks + d[:, None] * stride_kd,
                    mask=n_valid[None, :] & d_valid[:, None], other=0.0).to(tl.float32)  # [D, N]
        # Scaled after the dot, not folded into q: q stays exact in TF32 (see Numerics above).
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [M, N]
        s = tl.where((n[None, :] <= limit[:, None]) & n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * stride_vs + d[None, :] * stride_vd,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new

    # Rounded to nearest even through _tl.round_to: the CPU interpreter's own cast truncates.
    o = _tl.round_to(acc / l_i[:, None], out_ptr.dtype.element_ty)
    tl.store(out_ptr + row[:, None] * stride_or + (head[:, None] * HEAD_DIM + d[None, :]) * stride_oc,
             o, mask=m_valid[:, None] & d_valid[None, :])


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Up to this many rows, one program per query head (more programs, lower latency at decode and
# for the MCTP steps' 11-14 rows); above it, one program per KV head and row block (each K/V
# block serves the whole query-head group, for prefill).
_PER_HEAD_MAX_ROWS = 16


def _launch_config(rows: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                   heads_per_program: int | None = None) -> tuple[tuple[int, int], dict, dict]:
    """(grid, constexprs, launch options) for a problem; shared by the launcher and aot_variants()."""
    group = num_heads // num_kv_heads
    heads = heads_per_program or (1 if rows <= _PER_HEAD_MAX_ROWS else group)
    if heads not in (1, group):
        raise ValueError(f"heads_per_program must be 1 or the group size {group}, got {heads}")
    heads_p = triton.next_power_of_2(heads)
    # tl.dot needs M >= 16: 16 rows per program for one head, 64 (row, head) pairs for a group.
    block_m = 16 if heads == 1 else max(64, heads_p)
    block_r = block_m // heads_p
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Register budget, from `python -m vita_kernels.aot` at d = 128 on sm_90 (fp32 tiles, since
    # loads are cast to fp32): bf16/fp16 per-head tile, 32-slot blocks, 4 warps: 168 registers;
    # grouped 64-row tile, 8 warps: 192; both without spills, where 64-slot blocks spill. IEEE
    # fp32 dots (fp32 inputs) are FMA loops and need 16-slot blocks and 8 warps (98 / 142).
    fp32 = dtype == torch.float32
    block_n = 16 if fp32 or block_d > 128 else 32
    constexprs = dict(GROUP=group, HEADS=heads, HEADS_P=heads_p, BLOCK_R=block_r, BLOCK_N=block_n,
                      HEAD_DIM=head_dim, BLOCK_D=block_d, PRECISION="ieee" if fp32 else "tf32")
    options = dict(num_warps=4 if heads == 1 and not fp32 else 8, num_stages=2)
    grid = (num_kv_heads * (group // heads), triton.cdiv(rows, block_r))
    return grid, constexprs, options


def _check_args(q, k_cache, v_cache, pos, out) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [R, nq, d], got shape {list(q.shape)}")
    if k_cache.dim() != 3:
        raise ValueError(f"k_cache must be [nkv, S, d], got shape {list(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {list(v_cache.shape)}, expected k_cache's {list(k_cache.shape)}")
    rows, num_heads, head_dim = q.shape
    num_kv_heads, max_len, cache_dim = k_cache.shape
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q has dtype {q.dtype}, expected one of {_FLOAT_DTYPES}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected q's dtype {q.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("pos", pos)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, expected q's device {q.device}")
    if cache_dim != head_dim:
        raise ValueError(f"k_cache has head_dim {cache_dim}, expected q's head_dim {head_dim}")
    if rows < 1:
        raise ValueError(f"q has {rows} rows, expected at least 1")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"q has {num_heads} heads, expected a multiple of k_cache's {num_kv_heads} KV heads")
    if rows > max_len:
        raise ValueError(f"q has {rows} rows but the cache holds only {max_len} slots")
    if pos.dtype != torch.int64 or pos.numel() != 1:
        raise ValueError(f"pos must be an int64 tensor of one element, got {pos.dtype} of shape {list(pos.shape)}")
    if out is not None:
        if out.shape != (rows, num_heads * head_dim):
            raise ValueError(f"out has shape {list(out.shape)}, expected [{rows}, {num_heads * head_dim}]")
        if out.dtype != q.dtype:
            raise ValueError(f"out has dtype {out.dtype}, expected q's dtype {q.dtype}")
        if out.device != q.device:
            raise ValueError(f"out is on {out.device}, expected q's device {q.device}")


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    heads_per_program: int | None = None,
) -> torch.Tensor:
    """o[r, h] = softmax(q[r, h] . K[g(h), :pos+r+1]^T / sqrt(d)) @ V[g(h), :pos+r+1] (Triton).

    q: [R, nq, d]; k_cache, v_cache: [nkv, S, d] holding rows 0..pos+R-1; pos: int64 tensor [1]
    on q's device (read by the kernel, never synchronised on: the call is CUDA-graph capturable);
    out: optional [R, nq * d] destination. Any strides are accepted. Returns [R, nq * d] in q's
    dtype. `pos >= 0` and `pos + R <= S` are the caller's contract (checking them would need a
    device sync); slots at or past S are never read.
    `heads_per_program` (1 or nq / nkv) overrides the launch policy; tests use it to cover both.
    """
    _check_args(q, k_cache, v_cache, pos, out)
    rows, num_heads, head_dim = q.shape
    num_kv_heads, max_len, _ = k_cache.shape
    if out is None:
        out = torch.empty((rows, num_heads * head_dim), dtype=q.dtype, device=q.device)
    grid, constexprs, options = _launch_config(rows, num_heads, num_kv_heads, head_dim, q.dtype, heads_per_program)
    _attention_kernel[grid](
        q, k_cache, v_cache, pos, out,
        rows, max_len,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        math.log2(math.e) / math.sqrt(head_dim),
        **constexprs, **options,
    )
    return out


_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def aot_variants() -> list[tuple]:
    """(kernel, signature, constexprs, options) for the 7B launches: decode/MCTP and prefill, each dtype."""
    variants = []
    for dtype, name in _TRITON_DTYPES.items():
        for rows in (1, 256):  # per-head tile (R <= 16) and grouped tile (prefill)
            _, constexprs, options = _launch_config(rows, 28, 4, 128, dtype)
            signature = {"q_ptr": f"*{name}", "k_ptr": f"*{name}", "v_ptr": f"*{name}", "pos_ptr": "*i64",
                         "out_ptr": f"*{name}", "rows": "i32", "max_len": "i32"}
            for stride in ("stride_qr", "stride_qh", "stride_qd", "stride_kh", "stride_ks", "stride_kd",
                           "stride_vh", "stride_vs", "stride_vd", "stride_or", "stride_oc"):
                signature[stride] = "i32"
            signature["qk_scale"] = "fp32"
            signature.update({k: "constexpr" for k in constexprs})
            variants.append((_attention_kernel, signature, constexprs, options))
    return variants


# --------------------------------------------------------------------------------------------
# Optional flash-attn implementation (the `flash` extra; never installed in CI).
# --------------------------------------------------------------------------------------------
try:
    from flash_attn import flash_attn_with_kvcache as _flash_attn_with_kvcache
except ImportError:  # not installed, or installed without a usable CUDA build
    _flash_attn_with_kvcache = None


def attention_flash(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """attention_ref through flash-attn's `flash_attn_with_kvcache` (fp16/bf16, CUDA only).

    Layout: flash-attn wants caches as [B, S, nkv, d] with a contiguous last dim; ours are
    [nkv, S, d]. `k_cache.permute(1, 0, 2)[None]` is that layout as a strided view (row stride
    d, head stride S * d); flash-attn 2 takes batch/row/head strides and asserts only
    `stride(-1) == 1`, so no copy is made. (Not exercised in CI: flash-attn cannot be installed
    without CUDA.) Causality: with cache_seqlens = pos + R and R query rows, flash-attn's causal
    mask is aligned bottom-right, so row r sees slots 0..pos+r, as the reference. The int32
    `cache_seqlens` is computed on the device from `pos` (no sync). flash-attn has no `out=`, so
    the result is copied into `out` when one is given.
    """
    if _flash_attn_with_kvcache is None:
        raise RuntimeError("attention_flash needs flash-attn (pip install vita-kernels[flash])")
    _check_args(q, k_cache, v_cache, pos, out)
    if q.dtype not in (torch.float16, torch.bfloat16) or q.device.type != "cuda":
        raise ValueError(f"attention_flash needs fp16/bf16 CUDA tensors, got q {q.dtype} on {q.device}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension for flash-attn, strides {t.stride()}")
    rows, num_heads, head_dim = q.shape
    cache_seqlens = (pos + rows).to(torch.int32)
    o = _flash_attn_with_kvcache(q[None], k_cache.permute(1, 0, 2)[None], v_cache.permute(1, 0, 2)[None],
                                 cache_seqlens=cache_seqlens, causal=True)
    o = o.reshape(rows, num_heads * head_dim)
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


_IMPLS = {"triton": attention}
if _flash_attn_with_kvcache is not None:
    _IMPLS["flash"] = attention_flash

SPEC = OpSpec("attention", attention_ref, _cases, impls=_IMPLS)
