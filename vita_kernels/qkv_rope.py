"""Attention input of a decoder layer: RMSNorm + QKV (with bias) + RoPE + KV-cache write."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vita_kernels import _tl
from vita_kernels.norm import rmsnorm_ref
from vita_kernels.registry import GEOMETRIES, Case, Geometry, OpSpec, cache_position, norm_weight, randn, weight


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
    cache_rows: torch.Tensor,
    positions: torch.Tensor,
    rope_offset: int,
    num_heads: int,
    num_kv_heads: int,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q, k, v = split(rmsnorm(x) @ W_qkv^T + b); q, k = rope(q, k); cache[cache_rows[r]] = k, v.

    x: [R, H]; norm_weight: [H]; w_qkv: [(nq + 2 nkv) d, H] (q rows, then k, then v);
    b_qkv: [(nq + 2 nkv) d]; cos/sin_table: [P, d/2] fp32; k_cache, v_cache: [nkv, S, d]
    (written in place at slots cache_rows[r]); cache_rows, positions: int64 [R] on the device:
    row r's cache slot and its position in its own sequence (rows of several sequences may share
    a step, each sequence owning a region of the cache); the RoPE position of row r is
    positions[r] + rope_offset. Returns q: [R, nq, d].
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
    slots = cache_rows.reshape(rows)
    rope_pos = positions.reshape(rows) + rope_offset
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


@triton.jit
def _qkv_rope_cache_kernel(x_ptr, norm_w_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr,
                           cache_rows_ptr, positions_ptr, q_ptr, R, rope_offset, num_positions, cache_len, eps, stride_xr, stride_qr,
                           stride_qh, stride_kh, stride_ks, stride_vh, stride_vs,
                           H: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_HEADS: tl.constexpr,
                           NUM_KV_HEADS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_K: tl.constexpr, STATS_K: tl.constexpr):
    """One program: rows [pid_r * BLOCK_R, +BLOCK_R) x one head's column pairs (c, c + d/2) for
    c in [c0, c0 + BLOCK_H), with one accumulator per half, so rotate-half pairs meet in the
    same registers with no shuffle. Heads 0..nq-1 are q, then nkv k heads, then nkv v heads (not
    rotated: cos = 1, sin = 0 leaves them exact).

    Traffic: W_qkv and the bias once (the floor), x from L2, R * nq * d q outputs and R * nkv * d
    per cache written straight into slots cache_rows[r]: k and v never make a round trip.
    Slots and positions are read on the device, so a captured graph replays at any position.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    CHUNKS: tl.constexpr = (HALF + BLOCK_H - 1) // BLOCK_H
    pid = tl.program_id(0)
    head = pid // CHUNKS
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    col = (pid % CHUNKS) * BLOCK_H + tl.arange(0, BLOCK_H)  # column within the first half
    col_mask = col < HALF
    dtype: tl.constexpr = q_ptr.dtype.element_ty
    x_rows = x_ptr + rows.to(tl.int64) * stride_xr
    rstd = _tl.row_rstd(x_rows, row_mask, H, eps, eps, norm_w_ptr, NORMS=0, BLOCK_K=STATS_K)
    n_lo = head * HEAD_DIM + col
    n_hi = n_lo + HALF
    acc_lo = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
    acc_lo, acc_hi = _tl.gemv_accumulate(acc_lo, acc_hi, x_rows, row_mask, w_ptr + n_lo.to(tl.int64) * H,
                                         w_ptr + n_hi.to(tl.int64) * H, col_mask, H, 0,
                                         rstd, norm_w_ptr, rstd, norm_w_ptr, NORMS=1, TWO=True, BLOCK_K=BLOCK_K)
    # F.linear: bias added in fp32, one rounding.
    lo = _tl.round_to(acc_lo + tl.load(b_ptr + n_lo, mask=col_mask, other=0.0).to(tl.float32)[None, :], dtype)
    hi = _tl.round_to(acc_hi + tl.load(b_ptr + n_hi, mask=col_mask, other=0.0).to(tl.float32)[None, :], dtype)

    slots = tl.load(cache_rows_ptr + rows, mask=row_mask, other=0)  # int64 cache slots of the rows
    rope_pos = tl.load(positions_ptr + rows, mask=row_mask, other=0) + rope_offset
    mask = (row_mask & (rope_pos < num_positions))[:, None] & col_mask[None, :]
    cos = _tl.round_to(tl.load(cos_ptr + rope_pos[:, None] * HALF + col[None, :], mask=mask, other=1.0), dtype)
    sin = _tl.round_to(tl.load(sin_ptr + rope_pos[:, None] * HALF + col[None, :], mask=mask, other=0.0), dtype)
    # Head tests as [1, BLOCK_H] tensors (the interpreter cannot combine masks with scalar bools).
    head_v = (tl.zeros([BLOCK_H], dtype=tl.int32) + head)[None, :]
    rotated = head_v < NUM_HEADS + NUM_KV_HEADS
    cos = tl.where(rotated, cos, 1.0)
    sin = tl.where(rotated, sin, 0.0)
    # Qwen2 in the dtype: q * cos + rotate_half(q) * sin, each product and the sum rounded;
    # rotate_half gives (-hi, lo), so the first half subtracts.
    out_lo = _tl.round_to(_tl.round_to(lo * cos, dtype) - _tl.round_to(hi * sin, dtype), dtype)
    out_hi = _tl.round_to(_tl.round_to(hi * cos, dtype) + _tl.round_to(lo * sin, dtype), dtype)

    mask = row_mask[:, None] & col_mask[None, :]
    q_at = q_ptr + rows.to(tl.int64)[:, None] * stride_qr + head * stride_qh + col[None, :]
    is_q = mask & (head_v < NUM_HEADS)
    tl.store(q_at, out_lo, mask=is_q)
    tl.store(q_at + HALF, out_hi, mask=is_q)
    in_cache = mask & (slots < cache_len)[:, None]
    kv_head = head - NUM_HEADS
    k_at = k_cache_ptr + kv_head * stride_kh + slots[:, None] * stride_ks + col[None, :]
    is_k = in_cache & (head_v >= NUM_HEADS) & rotated
    tl.store(k_at, out_lo, mask=is_k)
    tl.store(k_at + HALF, out_hi, mask=is_k)
    v_at = v_cache_ptr + (kv_head - NUM_KV_HEADS) * stride_vh + slots[:, None] * stride_vs + col[None, :]
    is_v = in_cache & ~rotated
    tl.store(v_at, out_lo, mask=is_v)
    tl.store(v_at + HALF, out_hi, mask=is_v)


def config(target: str, rows: int, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int) -> dict:
    """Launch configuration on `target` ("cuda", or "cpu": the interpreter): the read-once GEMV
    configuration over the (nq + 2 nkv) * d/2 rotate-half column pairs, two weight tiles per K
    step, one row block for up to 128 rows."""
    half = head_dim // 2
    cfg = _tl.gemv_config(target, rows, (num_heads + 2 * num_kv_heads) * half, hidden, tiles=2, min_block_n=4,
                          normed=True)
    cfg.pop("SPLIT_K")  # never split: the epilogue (RoPE, cache write) needs whole dot products
    # A program stays inside one head: at most the (padded) half width, at least tl.dot's 16.
    block_h = min(cfg.pop("BLOCK_N"), max(triton.next_power_of_2(half), 16 if cfg["BLOCK_R"] >= 16 else 1))
    return dict(H=hidden, HEAD_DIM=head_dim, NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, BLOCK_H=block_h,
                **cfg)


def plan(x, norm_weight, w_qkv, b_qkv, cos_table, sin_table, k_cache, v_cache, cache_rows, positions, rope_offset,
         num_heads, num_kv_heads, eps, out, target: str | None = None) -> list[_tl.Launch]:
    """The launch `qkv_rope_cache` issues for validated tensors (meta tensors work)."""
    target = target or x.device.type
    rows, hidden = x.shape
    head_dim = k_cache.shape[2]
    cfg = config(target, rows, hidden, head_dim, num_heads, num_kv_heads)
    chunks = triton.cdiv(head_dim // 2, cfg["BLOCK_H"])
    grid = ((num_heads + 2 * num_kv_heads) * chunks, _tl.row_grid(rows, cfg["BLOCK_R"]))
    return [_tl.Launch(_qkv_rope_cache_kernel, grid,
                       (x, norm_weight, w_qkv, b_qkv, cos_table, sin_table, k_cache, v_cache, cache_rows, positions,
                        out, rows, rope_offset, cos_table.shape[0], k_cache.shape[1], float(eps), x.stride(0),
                        out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
                        v_cache.stride(1)), cfg)]


def qkv_rope_cache(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    w_qkv: torch.Tensor,
    b_qkv: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_rows: torch.Tensor,
    positions: torch.Tensor,
    rope_offset: int,
    num_heads: int,
    num_kv_heads: int,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q, k, v = split(rmsnorm(x) @ W_qkv^T + b); q, k = rope(q, k); cache[cache_rows[r]] = k, v: one Triton GEMV.

    Same contract as qkv_rope_cache_ref. x: [R, H]; norm_weight: [H]; w_qkv: [(nq + 2 nkv) d, H]
    contiguous; b_qkv: [(nq + 2 nkv) d]; cos/sin_table: [P, d/2] fp32 contiguous; k_cache,
    v_cache: [nkv, S, d] (unit last stride), written in place at slots cache_rows[r] only (slots
    at or past S and positions at or past P are not written / read: neither is brought to the
    host); cache_rows, positions: int64 [R] on the device. Returns q: [R, nq, d]. Grid at 7B
    (36 heads x 64 column pairs): 4-pair blocks (576 programs) at R <= 2, 16-pair tl.dot blocks
    (144) from 3 rows, one row block (W_qkv read once) for up to 128 rows.
    """
    dtype = _tl.model_dtype("x", x)
    dev = x.device
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if not isinstance(rope_offset, int) or rope_offset < 0:
        raise ValueError(f"rope_offset must be a non-negative int, got {rope_offset!r}")
    _tl.expect("k_cache", k_cache, [num_kv_heads, "S", "d"], dtype, dev)
    head_dim, cache_len = k_cache.shape[2], k_cache.shape[1]
    if head_dim % 2:
        raise ValueError(f"k_cache has head_dim {head_dim}, expected an even head_dim (rotate-half RoPE)")
    _tl.expect("v_cache", v_cache, [num_kv_heads, cache_len, head_dim], dtype, dev)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.stride(2) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension, got strides {list(cache.stride())}")
    n = (num_heads + 2 * num_kv_heads) * head_dim
    _tl.expect("w_qkv", w_qkv, [n, "H"], dtype, dev, contiguous=True)
    hidden = w_qkv.shape[1]
    _tl.expect("x", x, ["R", hidden], dtype, dev)
    rows = x.shape[0]
    _tl.expect("norm_weight", norm_weight, [hidden], dtype, dev, contiguous=True)
    _tl.expect("b_qkv", b_qkv, [n], dtype, dev, contiguous=True)
    _tl.expect("cos_table", cos_table, ["P", head_dim // 2], torch.float32, dev, contiguous=True)
    _tl.expect("sin_table", sin_table, [cos_table.shape[0], head_dim // 2], torch.float32, dev, contiguous=True)
    _tl.expect("cache_rows", cache_rows, [rows], torch.int64, dev, contiguous=True)
    _tl.expect("positions", positions, [rows], torch.int64, dev, contiguous=True)
    if out is None:
        out = torch.empty((rows, num_heads, head_dim), dtype=dtype, device=dev)
    else:
        _tl.expect_out("out", out, [rows, num_heads, head_dim], dtype, dev)
    if rows == 0:
        return out
    _tl.run_launches(plan(_tl.unit_stride(x), norm_weight, w_qkv, b_qkv, cos_table, sin_table, k_cache, v_cache,
                          cache_rows, positions, rope_offset, num_heads, num_kv_heads, eps, out))
    return out


def aot_launches() -> list[tuple[str, _tl.Launch]]:
    """(label, launch) at the 7B attention shape for every AOT row count."""
    geom = GEOMETRIES["7b"]
    h, d, nq, nkv = geom.hidden, geom.head_dim, geom.num_heads, geom.num_kv_heads
    n = (nq + 2 * nkv) * d
    meta = _tl.meta_tensor
    return _tl.aot_row_launches("qkv_rope_cache", lambda rows, dtype: plan(
        meta((rows, h), dtype), meta((h,), dtype), meta((n, h), dtype), meta((n,), dtype),
        meta((geom.cache_len + 16, d // 2), torch.float32), meta((geom.cache_len + 16, d // 2), torch.float32),
        meta((nkv, geom.cache_len, d), dtype), meta((nkv, geom.cache_len, d), dtype), meta((rows,), torch.int64),
        meta((rows,), torch.int64), 0, nq, nkv, geom.eps, meta((rows, nq, d), dtype), target="cuda"))


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
                      cache_rows=torch.arange(pos, pos + rows, dtype=torch.int64, device=device),
                      positions=torch.arange(pos, pos + rows, dtype=torch.int64, device=device) - 2,
                      rope_offset=rope_offset,
                      num_heads=nq, num_kv_heads=nkv, eps=geom.eps)
            size = torch.finfo(dtype).bits // 8
            moved = size * (n * h + n + rows * h + h + rows * n) + 4 * rows * d
            cases.append(Case(f"R{rows}-pos{pos}-off{rope_offset}", kw, mutated=("k_cache", "v_cache"),
                              bytes_moved=moved))
    return cases


SPEC = OpSpec("qkv_rope_cache", qkv_rope_cache_ref, _cases, impls={"triton": qkv_rope_cache})
