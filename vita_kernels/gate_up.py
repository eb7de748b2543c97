"""MLP input of a decoder layer: RMSNorm + gate/up projections + SiLU(gate) * up in one pass."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vita_kernels import _tl
from vita_kernels.norm import rmsnorm_ref
from vita_kernels.registry import GEOMETRIES, Case, Geometry, OpSpec, norm_weight, randn, weight


def norm_gate_up_ref(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = silu(h @ W_gate^T) * (h @ W_up^T), h = rmsnorm(x); each product rounded to dtype.

    x: [R, H]; norm_weight: [H]; w_gate_up: [2I, H] (gate rows first, then up rows).
    Returns [R, I].
    """
    h = rmsnorm_ref(x, norm_weight, eps)
    gate, up = F.linear(h, w_gate_up).chunk(2, dim=-1)
    y = F.silu(gate) * up
    if out is not None:
        out.copy_(y)
        return out
    return y


@triton.jit
def _norm_gate_up_kernel(x_ptr, norm_w_ptr, w_ptr, out_ptr, R, I, eps, stride_xr, stride_or,
                         H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         STATS_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """One program: rows [pid_r * BLOCK_R, +BLOCK_R) x MLP columns n in [pid_n * BLOCK_N, +BLOCK_N),
    with two accumulators: gate rows n and up rows I + n of w_gate_up, so the SiLU * up epilogue
    needs nothing from another program. (SPLIT_K is always 1: I = 18944 gives enough tiles.)

    Traffic: the [2I, H] weight once (the floor: one row block for <= 128 rows), x rows and norm
    weight from L2 (the RMS statistics are recomputed per program, STATS_K columns per step,
    instead of a separate norm launch + round trip), R * I outputs. The normalised activations
    are never written.
    """
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < I
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    rows64 = rows.to(tl.int64)
    x_rows = x_ptr + rows64 * stride_xr
    rstd = _tl.row_rstd(x_rows, row_mask, H, eps, eps, norm_w_ptr, NORMS=0, BLOCK_K=STATS_K)
    gate_rows = w_ptr + n.to(tl.int64) * H
    up_rows = w_ptr + (n + I).to(tl.int64) * H
    acc_gate = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    acc_gate, acc_up = _tl.gemv_accumulate(acc_gate, acc_up, x_rows, row_mask, gate_rows, up_rows, n_mask, H, 0,
                                           rstd, norm_w_ptr, rstd, norm_w_ptr, NORMS=1, TWO=True, BLOCK_K=BLOCK_K)
    # The reference rounds gate and up (F.linear), silu(gate) (F.silu) and the product.
    gate = _tl.round_to(acc_gate, dtype)
    up = _tl.round_to(acc_up, dtype)
    y = _tl.round_to(_tl.round_to(gate / (1.0 + tl.exp(-gate)), dtype) * up, dtype)
    mask = row_mask[:, None] & n_mask[None, :]
    tl.store(out_ptr + rows64[:, None] * stride_or + n[None, :], y, mask=mask)


def config(target: str, rows: int, intermediate: int, hidden: int) -> dict:
    """Launch configuration of `norm_gate_up` on `target` ("cuda", or "cpu": the interpreter)."""
    return dict(H=hidden, **_tl.gemv_config(target, rows, intermediate, hidden, tiles=2, normed=True))


def plan(x: torch.Tensor, norm_weight: torch.Tensor, w_gate_up: torch.Tensor, eps: float, out: torch.Tensor,
         target: str | None = None) -> list[_tl.Launch]:
    """The launch `norm_gate_up` issues for validated, unit-stride tensors (meta tensors work)."""
    rows, (two_i, hidden) = x.shape[0], w_gate_up.shape
    inter = two_i // 2
    cfg = config(target or x.device.type, rows, inter, hidden)
    grid = (triton.cdiv(inter, cfg["BLOCK_N"]), _tl.row_grid(rows, cfg["BLOCK_R"]))
    return [_tl.Launch(_norm_gate_up_kernel, grid,
                       (x, norm_weight, w_gate_up, out, rows, inter, float(eps), x.stride(0), out.stride(0)), cfg)]


def norm_gate_up(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = silu(h @ W_gate^T) * (h @ W_up^T), h = rmsnorm(x): one fused Triton GEMV (= norm_gate_up_ref).

    x: [R, H]; norm_weight: [H]; w_gate_up: [2I, H] contiguous (gate rows, then up rows); one
    dtype. Returns [R, I]. Grid at 7B (I = 18944): 8-column blocks of gate and up (2368
    programs) at R = 1 (2368 at R = 2); tl.dot blocks of 16-32 columns beyond, one row block for <= 128 rows.
    """
    dtype = _tl.model_dtype("x", x)
    dev = x.device
    _tl.expect("w_gate_up", w_gate_up, ["2I", "H"], dtype, dev, contiguous=True)
    two_i, hidden = w_gate_up.shape
    if two_i % 2:
        raise ValueError(f"w_gate_up has shape {list(w_gate_up.shape)}, expected an even number of rows [2I, H]")
    inter = two_i // 2
    _tl.expect("x", x, ["R", hidden], dtype, dev)
    _tl.expect("norm_weight", norm_weight, [hidden], dtype, dev, contiguous=True)
    rows = x.shape[0]
    if out is None:
        out = torch.empty((rows, inter), dtype=dtype, device=dev)
    else:
        _tl.expect_out("out", out, [rows, inter], dtype, dev)
    if rows == 0 or inter == 0:
        return out
    _tl.run_launches(plan(_tl.unit_stride(x), norm_weight, w_gate_up, eps, out))
    return out


def aot_launches() -> list[tuple[str, _tl.Launch]]:
    """(label, launch) at the 7B MLP shape for every AOT row count."""
    geom = GEOMETRIES["7b"]
    h, i = geom.hidden, geom.intermediate
    meta = _tl.meta_tensor
    return _tl.aot_row_launches("gate_up", lambda rows, dtype: plan(
        meta((rows, h), dtype), meta((h,), dtype), meta((2 * i, h), dtype), geom.eps, meta((rows, i), dtype),
        target="cuda"))


def _cases(geom: Geometry, dtype, device, gen) -> list[Case]:
    cases = []
    h, i = geom.hidden, geom.intermediate
    for rows in geom.rows:
        kw = dict(x=randn((rows, h), dtype, device, gen), norm_weight=norm_weight(h, dtype, device, gen),
                  w_gate_up=weight((2 * i, h), dtype, device, gen), eps=geom.eps)
        size = torch.finfo(dtype).bits // 8
        cases.append(Case(f"R{rows}-{2 * i}x{h}", kw, bytes_moved=size * (2 * i * h + rows * h + h + rows * i)))
    return cases


SPEC = OpSpec("norm_gate_up", norm_gate_up_ref, _cases, impls={"triton": norm_gate_up})
