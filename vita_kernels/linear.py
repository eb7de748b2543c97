"""Batch-1 GEMV family: out = residual + (x @ W^T + bias), for R = 1..16 rows (and more)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vita_kernels import _tl
from vita_kernels.registry import GEOMETRIES, Case, Geometry, OpSpec, randn, weight


def linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    out_rows: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = residual + (x @ W^T + bias).to(dtype); bias and residual optional.

    x: [R, K]; weight: [N, K]; bias: [N]; residual: [R, N]; all one dtype. Returns [R, N].
    The projection is rounded to the dtype before the residual add (as in Qwen2's
    `residual + o_proj(attn)`). out_rows: int64 [R]: row r goes to out[out_rows[r]] (out, any
    number of rows, required); other rows of out are left as they are. counters: the fused
    kernel's split-K arrival counters (int32, zeroed; see `_tl.counters_for`), unused here.
    """
    y = F.linear(x, weight, bias)
    if residual is not None:
        y = residual + y
    if out_rows is not None:
        out.index_copy_(0, out_rows, y)
        return out
    if out is not None:
        out.copy_(y)
        return out
    return y


@triton.jit
def linear_epilogue(acc, rows, out_at, row_mask, n, n_mask, b_ptr, res_ptr, out_ptr, stride_rr, stride_or,
                    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """out[out_at, n] = round(residual[rows] + round(acc + bias)): F.linear's rounding, then the
    residual add's. acc: [BR, BN] fp32 products; out_at: each row's output row (rows itself, or
    a scatter)."""
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    if HAS_BIAS:  # F.linear adds the bias to the fp32 accumulator and rounds once
        acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = _tl.round_to(acc, dtype)
    mask = row_mask[:, None] & n_mask[None, :]
    rows64 = rows.to(tl.int64)
    if HAS_RESIDUAL:  # residual + rounded projection, rounded again
        res = tl.load(res_ptr + rows64[:, None] * stride_rr + n[None, :], mask=mask, other=0.0).to(tl.float32)
        y = _tl.round_to(res + y, dtype)
    tl.store(out_ptr + out_at.to(tl.int64)[:, None] * stride_or + n[None, :], y, mask=mask)


@triton.jit
def store_partial(part_ptr, acc, rows, row_mask, n, n_mask, R, N):
    """Split-K: this program's fp32 products into partials[pid_k, rows, n] ([SPLIT_K, R, N])."""
    at = (tl.program_id(2) * R + rows).to(tl.int64)[:, None] * N + n[None, :]
    tl.store(part_ptr + at, acc, mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def split_k_sum(part_ptr, counter_ptr, acc, rows, row_mask, n, n_mask, R, N, SPLIT_K: tl.constexpr):
    """Split-K in one launch: store this program's partials; the last of the tile's SPLIT_K
    programs to arrive sums all of them, s = 0..SPLIT_K-1 in that order (bitwise reproducible,
    whoever arrives last), and returns (True, sum); the others return (False, acc).

    The partials make one round trip through L2 (SPLIT_K * R * N * 4 bytes, written and read
    once), instead of a second launch that would read them back.
    """
    store_partial(part_ptr, acc, rows, row_mask, n, n_mask, R, N)
    tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    last = _tl.last_to_arrive(counter_ptr + tile, SPLIT_K)
    if last:
        acc = tl.zeros(acc.shape, dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            at = (s * R + rows).to(tl.int64)[:, None] * N + n[None, :]
            acc += tl.load(part_ptr + at, mask=row_mask[:, None] & n_mask[None, :], other=0.0, cache_modifier=".cg")
    return last, acc


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, out_rows_ptr, part_ptr, counter_ptr, R, N, stride_xr,
                   stride_rr, stride_or, K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                   OUT_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   STATS_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """One program: rows [pid_r * BLOCK_R, +BLOCK_R) x output columns [pid_n * BLOCK_N, +BLOCK_N)
    x (SPLIT_K > 1) the K range [pid_k * K / SPLIT_K, +K / SPLIT_K).

    SPLIT_K = 1 applies the epilogue; otherwise the fp32 products go to the partials workspace
    and the tile's last program sums them in a fixed order and applies it (`split_k_sum`).
    OUT_ROWS: row r is stored at out[out_rows[r]] (a scatter into a history buffer).

    Traffic: the [BLOCK_N, K] weight slab once (N * K * size over the grid: the floor, since
    every weight is needed once and the grid has one row block for <= 128 rows), x rows from L2,
    R * N outputs (+ R * N residual, N bias); split-K adds SPLIT_K * R * N * 4 bytes of partials.
    STATS_K is unused here (no norm prologue); the launchers share one configuration.
    """
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    K_SPLIT: tl.constexpr = K // SPLIT_K
    k_lo = 0
    if SPLIT_K > 1:
        k_lo = tl.program_id(2) * K_SPLIT
    w_rows = w_ptr + n.to(tl.int64) * K
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    acc, _ = _tl.gemv_accumulate(acc, acc, x_ptr + rows.to(tl.int64) * stride_xr + k_lo, row_mask, w_rows, w_rows,
                                 n_mask, K_SPLIT, k_lo, acc, w_ptr, acc, w_ptr, NORMS=0, TWO=False, BLOCK_K=BLOCK_K)
    out_at = rows
    if OUT_ROWS:
        out_at = tl.load(out_rows_ptr + rows, mask=row_mask, other=0)
    if SPLIT_K > 1:
        last, acc = split_k_sum(part_ptr, counter_ptr, acc, rows, row_mask, n, n_mask, R, N, SPLIT_K)
        if last:
            linear_epilogue(acc, rows, out_at, row_mask, n, n_mask, b_ptr, res_ptr, out_ptr, stride_rr, stride_or,
                            HAS_BIAS, HAS_RESIDUAL)
    else:
        linear_epilogue(acc, rows, out_at, row_mask, n, n_mask, b_ptr, res_ptr, out_ptr, stride_rr, stride_or,
                        HAS_BIAS, HAS_RESIDUAL)


def split_k_buffers(grid: tuple[int, int, int], rows: int, n: int, counters, placeholder: torch.Tensor):
    """(partials, arrival counters) of a split-K launch over `grid` (its third axis the split):
    [SPLIT_K, rows, n] fp32 partials and one counter per (column tile, row block); without a
    split, `placeholder` for both (the kernel never touches them)."""
    if grid[2] == 1:
        return placeholder, placeholder
    partials = torch.empty((grid[2], rows, n), dtype=torch.float32, device=placeholder.device)
    return partials, _tl.counters_for(grid[0] * grid[1], counters, placeholder.device)


def config(target: str, rows: int, n: int, k: int) -> dict:
    """Launch configuration (constexprs and options) of `linear` for `rows` x [n, k] on `target`
    ("cuda" or "cpu", the interpreter)."""
    return dict(K=k, **_tl.gemv_config(target, rows, n, k, split_align=k))


def plan(x: torch.Tensor, weight: torch.Tensor, bias, residual, out: torch.Tensor, out_rows=None,
         counters=None, target: str | None = None) -> list[_tl.Launch]:
    """The launch `linear` issues for validated, unit-stride tensors (meta tensors work: the
    AOT build and the geometry tests plan without a GPU). Allocates the split-K partials."""
    target = target or x.device.type
    rows, (n, k) = x.shape[0], weight.shape
    cfg = config(target, rows, n, k)
    split_k = cfg["SPLIT_K"]
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), _tl.row_grid(rows, cfg["BLOCK_R"]), split_k)
    partials, arrivals = split_k_buffers(grid, rows, n, counters, x)
    return [_tl.Launch(_linear_kernel, grid,
                       (x, weight, bias if bias is not None else weight, residual if residual is not None else out,
                        out, out_rows if out_rows is not None else x, partials, arrivals, rows, n, x.stride(0),
                        residual.stride(0) if residual is not None else 0, out.stride(0)),
                       dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                            OUT_ROWS=out_rows is not None, **cfg))]


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    out_rows: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = residual + (x @ W^T + bias).to(dtype): the fused Triton GEMV; same contract as linear_ref.

    x: [R, K]; weight: [N, K] contiguous; bias: [N]; residual: [R, N]; one dtype (fp32, bf16,
    fp16); out_rows: int64 [R] scatters row r to out[out_rows[r]] (out required, any number of
    rows). Returns [R, N] (or `out`). One launch. Grid at 7B (N = 3584): 4-row weight slabs at
    R <= 2 (896 programs); at R = 3..16 16-row slabs with tl.dot, split four ways along K (896
    programs; each tile's last program sums the partials and applies the epilogue); at R =
    17..128 one row block of 32-128 rows covers all rows (the weight is read once), split along
    K while the partials stay under 1/8 of the weight bytes (see `_tl.gemv_config`). The split-K
    partials ([SPLIT_K, R, N] fp32) are allocated per call (inside a CUDA graph capture from the
    graph's private pool); `counters` (int32, zeroed, left zeroed) avoids a memset per call.
    """
    dtype = _tl.model_dtype("x", x)
    dev = x.device
    _tl.expect("weight", weight, ["N", "K"], dtype, dev, contiguous=True)
    n, k = weight.shape
    _tl.expect("x", x, ["R", k], dtype, dev)
    rows = x.shape[0]
    if bias is not None:
        _tl.expect("bias", bias, [n], dtype, dev, contiguous=True)
    if residual is not None:
        _tl.expect("residual", residual, [rows, n], dtype, dev)
        residual = _tl.unit_stride(residual)
    if out_rows is not None:
        _tl.expect("out_rows", out_rows, [rows], torch.int64, dev, contiguous=True)
        _tl.expect_out("out", out, ["S", n], dtype, dev)
    elif out is None:
        out = torch.empty((rows, n), dtype=dtype, device=dev)
    else:
        _tl.expect_out("out", out, [rows, n], dtype, dev)
    if rows == 0 or n == 0:
        return out
    _tl.run_launches(plan(_tl.unit_stride(x), weight, bias, residual, out, out_rows, counters))
    return out


def aot_launches() -> list[tuple[str, _tl.Launch]]:
    """(label, launch) for the 7B projections at every AOT row count: o_proj and down_proj with
    the residual, a biased k/v-sized projection."""
    geom = GEOMETRIES["7b"]
    meta = _tl.meta_tensor
    shapes = [("o_proj", geom.num_heads * geom.head_dim, geom.hidden, False, True),
              ("down_proj", geom.intermediate, geom.hidden, False, True),
              ("k_proj", geom.hidden, geom.num_kv_heads * geom.head_dim, True, False)]
    return [item for label, k, n, has_bias, has_res in shapes for item in _tl.aot_row_launches(
        label, lambda rows, dtype, k=k, n=n, b=has_bias, r=has_res: plan(
            meta((rows, k), dtype), meta((n, k), dtype), meta((n,), dtype) if b else None,
            meta((rows, n), dtype) if r else None, meta((rows, n), dtype), target="cuda"))]


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


SPEC = OpSpec("linear", linear_ref, _cases, impls={"triton": linear})
