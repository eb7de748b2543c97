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
    cache_rows: torch.Tensor,
    positions: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    seqs: torch.Tensor | None = None,
    max_seq_rows: int | None = None,
    window: int | None = None,
    kv_splits: int | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """o[r, h] = softmax(q[r, h] . K[g(h), a_r:c_r+1]^T / sqrt(d)) @ V[g(h), a_r:c_r+1], in fp32,
    with c_r = cache_rows[r] and a_r = c_r - positions[r].

    q: [R, nq, d]; k_cache, v_cache: [nkv, S, d], each sequence of the step owning a region of
    the cache that already holds its rows up to c_r; cache_rows, positions: int64 [R] on the
    device, row r's own cache slot and its position in its sequence (so it sees its sequence's
    slots a_r..c_r, causally); g(h) = h // (nq / nkv). Returns [R, nq * d] in q's dtype. Slots
    outside a_r..c_r are masked, never read as data. `seqs` ([B, 2] int64: first row and row
    count of each sequence, rows of a sequence contiguous) and `max_seq_rows` (a bound on the
    row counts), `kv_splits` and `counters` only shape the fused kernel's launch; the reference reads rows
    individually.
    `window`: a static bound on positions[r] + 1; when given, each row reads only the `window`
    slots from its region's start (a gather), instead of scoring the whole cache.
    """
    rows, num_heads, head_dim = q.shape
    num_kv_heads, max_len, _ = k_cache.shape
    group = num_heads // num_kv_heads
    qg = q.float().view(rows, num_kv_heads, group, head_dim).transpose(0, 1)  # [nkv, R, group, d]
    if window is None:
        last = cache_rows.reshape(rows, 1)
        slot = torch.arange(max_len, device=q.device)
        hidden = (slot > last) | (slot < last - positions.reshape(rows, 1))  # [R, S]
        keys, values = k_cache.float()[:, None], v_cache.float()[:, None]  # [nkv, 1, S, d]
    else:  # slot first_r + j for j < window: visible while j <= positions[r]
        offset = torch.arange(min(window, max_len), device=q.device)
        slots = (cache_rows - positions).reshape(rows, 1).add(offset).clamp_(max=max_len - 1)  # [R, W]
        hidden = offset > positions.reshape(rows, 1)
        keys, values = k_cache[:, slots].float(), v_cache[:, slots].float()  # [nkv, R, W, d]
    scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(1.0 / math.sqrt(head_dim))  # [nkv, R, group, S or W]
    scores.masked_fill_(hidden[None, :, None, :], float("-inf"))
    o = torch.matmul(scores.softmax(dim=-1), values)  # [nkv, R, group, d]
    o = o.transpose(0, 1).reshape(rows, num_heads * head_dim).to(q.dtype)
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
# once per query head). The grid is (head programs, sequences, row blocks of the longest
# sequence): a program's rows all belong to one sequence, hence to one cache region, and it
# walks that region in BLOCK_N slots from its start to the last slot its last row can see.
# Sequences, slots and positions are loaded on the device: the grid depends on the number of
# sequences and the row bound only, so a launch is CUDA-graph capturable for any positions.
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
    q_ptr, k_ptr, v_ptr, cache_rows_ptr, positions_ptr, seqs_ptr, out_ptr, part_ptr, counter_ptr,
    max_len, rows, num_q_heads, split_len,
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
    SPLITS: tl.constexpr,  # KV splits: 1 writes `out`; more write partials, merged by the last split
):
    BLOCK_M: tl.constexpr = BLOCK_R * HEADS_P
    CHUNKS: tl.constexpr = GROUP // HEADS
    pid_h = tl.program_id(0) // SPLITS  # kv_head * CHUNKS + chunk
    split = tl.program_id(0) % SPLITS
    pid_b = tl.program_id(1)  # sequence
    pid_r = tl.program_id(2)  # row block within the sequence
    kv_head = pid_h // CHUNKS
    first_row = tl.load(seqs_ptr + 2 * pid_b)
    seq_rows = tl.load(seqs_ptr + 2 * pid_b + 1)

    m = tl.arange(0, BLOCK_M)
    local = pid_r * BLOCK_R + m // HEADS_P
    row = first_row + local
    head = pid_h * HEADS + m % HEADS_P  # query head: kv_head * GROUP + chunk * HEADS + i
    row_valid = local < seq_rows
    m_valid = row_valid & (m % HEADS_P < HEADS)
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM

    last = tl.load(cache_rows_ptr + row, mask=row_valid, other=0)  # int64: the row's own slot
    first = last - tl.load(positions_ptr + row, mask=row_valid, other=0)  # its region's start
    start = tl.min(tl.where(row_valid, first, max_len), 0)  # one region per program
    kv_end = tl.minimum(tl.max(tl.where(row_valid, last + 1, 0), 0), max_len)
    # Padding rows (and whole padding programs, where kv_end <= start) see the region's first
    # slot only: harmless, never stored.
    limit = tl.where(row_valid, last, start)

    q = tl.load(q_ptr + row[:, None] * stride_qr + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)

    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Split `split` walks slots [lo, hi) of the region (all of it when SPLITS = 1).
    lo = start + split * split_len
    hi = tl.minimum(kv_end, lo + split_len) if SPLITS > 1 else kv_end
    # Without splits the region's first slot is in the first block and visible to every tile
    # row, so m_i is finite after the first iteration and no row computes exp2(-inf - -inf). A
    # split may hold no slot a row sees: there the row's maximum stays -inf and is read as 0.
    for block in range(lo, hi, BLOCK_N):
        n = block + tl.arange(0, BLOCK_N)
        n_valid = n < hi
        k = tl.load(k_base + n[None, :] * stride_ks + d[:, None] * stride_kd,
                    mask=n_valid[None, :] & d_valid[:, None], other=0.0).to(tl.float32)  # [D, N]
        # Scaled after the dot, not folded into q: q stays exact in TF32 (see Numerics above).
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [M, N]
        s = tl.where((n[None, :] <= limit[:, None]) & n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if SPLITS > 1:
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * stride_vs + d[None, :] * stride_vd,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new

    if SPLITS == 1:
        # Rounded to nearest even through _tl.round_to: the CPU interpreter's own cast truncates.
        # l_i is 0 only in padding programs (no row of theirs is stored).
        o = _tl.round_to(acc / tl.where(l_i > 0, l_i, 1.0)[:, None], out_ptr.dtype.element_ty)
        tl.store(out_ptr + row[:, None] * stride_or + (head[:, None] * HEAD_DIM + d[None, :]) * stride_oc,
                 o, mask=m_valid[:, None] & d_valid[None, :])
    else:
        # Partials [SPLITS, rows, nq, HEAD_DIM + 2]: the unnormalised output, then max and sum.
        at = part_ptr + ((split * rows + row.to(tl.int64)) * num_q_heads + head) * (HEAD_DIM + 2)  # [BLOCK_M]
        tl.store(at[:, None] + d[None, :], acc, mask=m_valid[:, None] & d_valid[None, :])
        tl.store(at + HEAD_DIM, m_i, mask=m_valid)
        tl.store(at + HEAD_DIM + 1, l_i, mask=m_valid)
        group = (pid_h * tl.num_programs(1) + pid_b) * tl.num_programs(2) + pid_r
        if _tl.last_to_arrive(counter_ptr + group, SPLITS):
            # The last split to finish merges all of them, s = 0..SPLITS-1 in that order
            # (deterministic): o = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s, m = max_s m_s.
            base = part_ptr + (row.to(tl.int64) * num_q_heads + head) * (HEAD_DIM + 2)
            stride_split = rows * num_q_heads * (HEAD_DIM + 2)
            m_all = tl.full([BLOCK_M], float("-inf"), tl.float32)
            for s in tl.static_range(SPLITS):
                m_s = tl.load(base + s * stride_split + HEAD_DIM, mask=m_valid, other=float("-inf"),
                              cache_modifier=".cg")
                m_all = tl.maximum(m_all, m_s)
            m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # padding pairs only: never stored
            num = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            den = tl.zeros([BLOCK_M], tl.float32)
            for s in tl.static_range(SPLITS):
                split_at = base + s * stride_split
                m_s = tl.load(split_at + HEAD_DIM, mask=m_valid, other=float("-inf"), cache_modifier=".cg")
                w = tl.exp2(m_s - m_all)  # 0 for a split that holds no visible slot
                den += w * tl.load(split_at + HEAD_DIM + 1, mask=m_valid, other=0.0, cache_modifier=".cg")
                num += w[:, None] * tl.load(split_at[:, None] + d[None, :], mask=m_valid[:, None] & d_valid[None, :],
                                            other=0.0, cache_modifier=".cg")
            o = _tl.round_to(num / tl.where(den > 0, den, 1.0)[:, None], out_ptr.dtype.element_ty)
            tl.store(out_ptr + row[:, None] * stride_or + (head[:, None] * HEAD_DIM + d[None, :]) * stride_oc,
                     o, mask=m_valid[:, None] & d_valid[None, :])


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Up to this many rows per sequence, one program per query head (more programs, lower latency at
# decode and for the MCTP steps' 11-14 rows); above it, one program per KV head and row block
# (each K/V block serves the whole query-head group, for prefill).
_PER_HEAD_MAX_ROWS = 16
# KV splits only pay where a sequence can be this long: shorter walks are latency-bound already.
_SPLIT_MIN_SLOTS = 512
_MAX_SPLITS = 16
# Programs a split launch aims for: one per SM of a 132-SM H100/H200 (each walks >= 64 slots);
# on the CPU interpreter a few, enough to run every split path.
_SPLIT_TARGET_PROGRAMS = {"cuda": 132, "cpu": 4}


def _launch_config(max_seq_rows: int, num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype, heads_per_program: int | None = None, window: int | None = None,
                   device_type: str = "cuda", kv_splits: int | None = None) -> tuple[tuple[int, int, int], dict, dict]:
    """(grid, constexprs, launch options) for a problem; shared by the launcher and aot_variants().

    KV splits (flash-decoding): where the grid has fewer programs than TARGET_PROGRAMS and the
    static bound on the sequence length (`window`) holds at least _SPLIT_MIN_SLOTS slots, each
    program's region is cut into SPLITS ranges of `split_len` slots (a multiple of BLOCK_N),
    run by separate programs; the last of a group's splits to finish merges their partials in a
    fixed order (one launch).
    At 7B decode (28 per-head programs) with a 512-slot bound: 5 splits of 128 slots, 140
    programs for 132 SMs, where one program per head would keep 21% of the SMs busy.
    """
    group = num_heads // num_kv_heads
    heads = heads_per_program or (1 if max_seq_rows <= _PER_HEAD_MAX_ROWS else group)
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
    programs = num_kv_heads * (group // heads) * num_seqs * triton.cdiv(max_seq_rows, block_r)
    splits = 1
    if kv_splits is not None:
        splits = kv_splits
    elif heads == 1 and window is not None and window >= _SPLIT_MIN_SLOTS:  # decode and MCTP steps
        splits = min(triton.cdiv(_SPLIT_TARGET_PROGRAMS[device_type], programs), triton.cdiv(window, 2 * block_n))
    splits = max(1, min(splits, _MAX_SPLITS))
    split_len = triton.cdiv(triton.cdiv(window or 1, splits), block_n) * block_n if splits > 1 else 0
    constexprs = dict(GROUP=group, HEADS=heads, HEADS_P=heads_p, BLOCK_R=block_r, BLOCK_N=block_n,
                      HEAD_DIM=head_dim, BLOCK_D=block_d, PRECISION="ieee" if fp32 else "tf32", SPLITS=splits)
    options = dict(num_warps=4 if heads == 1 and not fp32 else 8, num_stages=2, split_len=split_len)
    grid = (num_kv_heads * (group // heads) * splits, num_seqs, triton.cdiv(max_seq_rows, block_r))
    return grid, constexprs, options


def _check_args(q, k_cache, v_cache, cache_rows, positions, seqs, out) -> None:
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
    if cache_dim != head_dim:
        raise ValueError(f"k_cache has head_dim {cache_dim}, expected q's head_dim {head_dim}")
    if rows < 1:
        raise ValueError(f"q has {rows} rows, expected at least 1")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"q has {num_heads} heads, expected a multiple of k_cache's {num_kv_heads} KV heads")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, expected q's device {q.device}")
    for name, t in (("cache_rows", cache_rows), ("positions", positions)):
        _tl.expect(name, t, [rows], torch.int64, q.device, contiguous=True)
    if seqs is not None:
        _tl.expect("seqs", seqs, ["B", 2], torch.int64, q.device, contiguous=True)
    if out is not None:
        _tl.expect_out("out", out, [rows, num_heads * head_dim], q.dtype, q.device)


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_rows: torch.Tensor,
    positions: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    seqs: torch.Tensor | None = None,
    max_seq_rows: int | None = None,
    window: int | None = None,
    heads_per_program: int | None = None,
    kv_splits: int | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """o[r, h] = softmax(q[r, h] . K[g(h), a_r:c_r+1]^T / sqrt(d)) @ V[g(h), a_r:c_r+1], c_r =
    cache_rows[r], a_r = c_r - positions[r] (Triton; = attention_ref).

    q: [R, nq, d]; k_cache, v_cache: [nkv, S, d]; cache_rows, positions: int64 [R] on q's device
    (read by the kernel, never synchronised on: the call is CUDA-graph capturable); out: optional
    [R, nq * d] destination. Any strides are accepted for q and the caches. Returns [R, nq * d]
    in q's dtype. seqs: int64 [B, 2] on the device, (first row, row count) of each sequence
    (rows of a sequence contiguous and in one cache region; padding entries with 0 rows do
    nothing); None: all R rows are one sequence. max_seq_rows: a bound on every sequence's row
    count (the grid's third axis; default R). `window`: the static bound on positions + 1; the
    kernel walks each region only as far as its rows see, and uses the bound to decide whether to
    split the walk over several programs (see `_launch_config`; `kv_splits` forces a count). `0 <= a_r <= c_r < S` and consistent `seqs` are the
    caller's contract (checking them would need a device sync); slots at or past S are never read.
    `heads_per_program` (1 or nq / nkv) overrides the launch policy; tests use it to cover both.
    One launch, split or not; counters: the split groups' arrival counters (int32, zeroed, left
    zeroed; default: a fresh zeroed buffer).
    """
    _check_args(q, k_cache, v_cache, cache_rows, positions, seqs, out)
    rows, num_heads, head_dim = q.shape
    num_kv_heads, max_len, _ = k_cache.shape
    if out is None:
        out = torch.empty((rows, num_heads * head_dim), dtype=q.dtype, device=q.device)
    if seqs is None:
        seqs = torch.tensor([[0, rows]], dtype=torch.int64, device=q.device)
    max_seq_rows = rows if max_seq_rows is None else max_seq_rows
    if not isinstance(max_seq_rows, int) or max_seq_rows < 1:
        raise ValueError(f"max_seq_rows must be a positive int, got {max_seq_rows!r}")
    if kv_splits is not None and (not isinstance(kv_splits, int) or not 1 <= kv_splits <= _MAX_SPLITS):
        raise ValueError(f"kv_splits must be an int in [1, {_MAX_SPLITS}], got {kv_splits!r}")
    bound = min(window, max_len) if window is not None else max_len
    grid, constexprs, options = _launch_config(max_seq_rows, seqs.shape[0], num_heads, num_kv_heads, head_dim,
                                               q.dtype, heads_per_program, bound, q.device.type, kv_splits)
    split_len = options.pop("split_len")
    splits = constexprs["SPLITS"]
    # Partials of a split launch: [SPLITS, R, nq, d + 2] fp32 (d outputs, max, sum): at 7B decode
    # 5 x 28 x 130 x 4 B = 73 KB, read back once by the last split of each group.
    part, arrivals = out, cache_rows  # placeholders where unused
    if splits > 1:
        part = torch.empty((splits, rows, num_heads, head_dim + 2), dtype=torch.float32, device=q.device)
        arrivals = _tl.counters_for(grid[0] // splits * grid[1] * grid[2], counters, q.device)
    _attention_kernel[grid](
        q, k_cache, v_cache, cache_rows, positions, seqs, out, part, arrivals,
        max_len, rows, num_heads, split_len,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        math.log2(math.e) / math.sqrt(head_dim),
        **constexprs, **options,
    )
    return out


_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def aot_variants() -> list[tuple]:
    """(kernel, signature, constexprs, options) for the 7B launches: decode/MCTP (512-slot bound,
    split) and prefill, each dtype."""
    variants = []
    for dtype, name in _TRITON_DTYPES.items():
        for rows in (1, 256):  # per-head tile (R <= 16) and grouped tile (prefill)
            _, constexprs, options = _launch_config(rows, 1, 28, 4, 128, dtype, window=512)
            options.pop("split_len")
            signature = {"q_ptr": f"*{name}", "k_ptr": f"*{name}", "v_ptr": f"*{name}", "cache_rows_ptr": "*i64",
                         "positions_ptr": "*i64", "seqs_ptr": "*i64", "out_ptr": f"*{name}", "part_ptr": "*fp32", "counter_ptr": "*i32",
                         "max_len": "i32", "rows": "i32", "num_q_heads": "i32", "split_len": "i32"}
            for stride in ("stride_qr", "stride_qh", "stride_qd", "stride_kh", "stride_ks", "stride_kd",
                           "stride_vh", "stride_vs", "stride_vd", "stride_or", "stride_oc"):
                signature[stride] = "i32"
            signature["qk_scale"] = "fp32"
            signature.update({k: "constexpr" for k in constexprs})
            variants.append((_attention_kernel, signature, constexprs, options))
    return variants


def _cases(geom: Geometry, dtype, device, gen) -> list[Case]:
    """One sequence at cache slot 0 or further in, and two sequences in separate cache regions."""
    cases = []
    d, nq, nkv = geom.head_dim, geom.num_heads, geom.num_kv_heads
    size = torch.finfo(dtype).bits // 8

    def ints(values):
        return torch.tensor(values, dtype=torch.int64, device=device)

    for rows in geom.rows:
        for pos in sorted({0, cache_position(geom, rows)}):
            kw = dict(q=randn((rows, nq, d), dtype, device, gen),
                      k_cache=randn((nkv, geom.cache_len, d), dtype, device, gen),
                      v_cache=randn((nkv, geom.cache_len, d), dtype, device, gen),
                      cache_rows=ints(range(pos, pos + rows)), positions=ints(range(pos, pos + rows)))
            moved = size * (2 * nkv * (pos + rows) * d + 2 * rows * nq * d)
            cases.append(Case(f"R{rows}-pos{pos}", kw, bytes_moved=moved))
    # Two sequences sharing one step: 3 rows at position 4 of the region at slot 20, then 1 row
    # at position 9 of the region at slot 2 (regions in any order), with a padding entry.
    rows_a, pos_a, start_a, pos_b, start_b = 3, 4, 20, 9, 2
    kw = dict(q=randn((rows_a + 1, nq, d), dtype, device, gen),
              k_cache=randn((nkv, geom.cache_len, d), dtype, device, gen),
              v_cache=randn((nkv, geom.cache_len, d), dtype, device, gen),
              cache_rows=ints([start_a + pos_a + i for i in range(rows_a)] + [start_b + pos_b]),
              positions=ints([pos_a + i for i in range(rows_a)] + [pos_b]),
              seqs=ints([[0, rows_a], [rows_a, 1], [rows_a + 1, 0]]), max_seq_rows=rows_a)
    moved = size * (2 * nkv * (pos_a + rows_a + pos_b + 1) * d + 8 * nq * d)
    cases.append(Case("2seq", kw, bytes_moved=moved))
    cases.append(Case("2seq-window", {**kw, "window": 16}, bytes_moved=moved))
    cases.append(Case("2seq-3splits", {**kw, "window": 16, "kv_splits": 3}, bytes_moved=moved))
    return cases


SPEC = OpSpec("attention", attention_ref, _cases, impls={"triton": attention})
