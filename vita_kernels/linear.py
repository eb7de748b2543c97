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


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, R, N, stride_xr, stride_rr, stride_or,
                   K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: rows [pid_r * BLOCK_R, +BLOCK_R) x output columns [pid_n * BLOCK_N, +BLOCK_N).

    Traffic: the [BLOCK_N, K] weight slab once (N * K * size over the grid: the floor, since
    every weight is needed once), x rows from L2, R * N outputs (+ R * N residual, N bias).
    """
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    w_rows = w_ptr + n.to(tl.int64) * K
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    acc, _ = _tl.gemv_accumulate(acc, acc, x_ptr + rows * stride_xr, row_mask, w_rows, w_rows, n_mask, K, 0,
                                 acc, w_ptr, acc, w_ptr, NORMS=0, TWO=False, BLOCK_K=BLOCK_K)
    if HAS_BIAS:  # F.linear adds the bias to the fp32 accumulator and rounds once
        acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = _tl.round_to(acc, dtype)
    mask = row_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:  # residual + rounded projection, rounded again
        res = tl.load(res_ptr + rows[:, None] * stride_rr + n[None, :], mask=mask, other=0.0).to(tl.float32)
        y = _tl.round_to(res + y, dtype)
    tl.store(out_ptr + rows[:, None] * stride_or + n[None, :], y, mask=mask)


def _config(device_type: str, rows: int, n: int, k: int) -> dict:
    return dict(K=k, **_tl.gemv_blocks(device_type, rows, n, k))


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = residual + (x @ W^T + bias).to(dtype): the fused Triton GEMV; same contract as linear_ref.

    x: [R, K]; weight: [N, K] contiguous; bias: [N]; residual: [R, N]; one dtype (fp32, bf16,
    fp16). Returns [R, N] (or `out`). Grid at 7B (N = 3584): 8-row weight slabs at R <= 4 (448
    programs), 16 with tl.dot beyond (224); x rows in blocks of 1/2/4/16.
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
    if out is None:
        out = torch.empty((rows, n), dtype=dtype, device=dev)
    else:
        _tl.expect_out("out", out, [rows, n], dtype, dev)
    if rows == 0 or n == 0:
        return out
    x = _tl.unit_stride(x)
    cfg = _config(dev.type, rows, n, k)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(rows, cfg["BLOCK_R"]))
    _linear_kernel[grid](x, weight, bias if bias is not None else weight,
                         residual if residual is not None else out, out, rows, n, x.stride(0),
                         residual.stride(0) if residual is not None else 0, out.stride(0),
                         HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                         num_warps=_tl.NUM_WARPS, **cfg)
    return out


def aot_variants() -> list[tuple]:
    """(kernel, signature, constexprs) for the 7B projections: o_proj and down_proj with the
    residual, a biased projection (k/v-sized)."""
    geom = GEOMETRIES["7b"]
    shapes = [(geom.num_heads * geom.head_dim, geom.hidden, False, True),
              (geom.intermediate, geom.hidden, False, True),
              (geom.hidden, geom.num_kv_heads * geom.head_dim, True, False)]
    return [variant for k, n, has_bias, has_res in shapes for variant in _tl.aot_row_variants(
        _linear_kernel, lambda p: dict(x_ptr=p, w_ptr=p, b_ptr=p, res_ptr=p, out_ptr=p),
        lambda rows, k=k, n=n, b=has_bias, r=has_res: dict(_config("cuda", rows, n, k), HAS_BIAS=b, HAS_RESIDUAL=r))]


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
