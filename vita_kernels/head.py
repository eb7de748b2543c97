"""Output head: shared final RMSNorm + full-vocabulary GEMV, fused with greedy argmax."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vita_kernels import _tl
from vita_kernels.norm import rmsnorm_ref
from vita_kernels.registry import GEOMETRIES, Case, Geometry, OpSpec, norm_weight, randn, weight


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
    """ids = argmax(head_logits(x)), the lowest id among equal maxima; a NaN logit wins (the
    lowest id among NaNs), as torch.argmax decides. Returns [R] int64."""
    ids = head_logits_ref(x, norm_weight, w_head, eps).argmax(dim=-1)
    if out is not None:
        out.copy_(ids)
        return out
    return ids


@triton.jit
def _head_kernel(x_ptr, norm_w_ptr, w_ptr, out_ptr, idx_ptr, R, V, eps, stride_xr, stride_or,
                 H: tl.constexpr, WRITE_LOGITS: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STATS_K: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    """One program: rows [pid_r * BLOCK_R, +BLOCK_R) x vocabulary ids [pid_n * BLOCK_N, +BLOCK_N).

    WRITE_LOGITS: out[r, id] = the logit (fp32 holding a model-dtype value). Otherwise out/idx
    are the argmax workspace [R, num_blocks]: this block's (max logit, lowest id reaching it).
    Logits are compared after rounding to the model dtype, as the reference's are, so ties
    and their lowest-id resolution match it. A NaN logit wins, as in torch.argmax: a block with
    NaNs reports (NaN, its lowest NaN id). (SPLIT_K is always 1: V gives enough tiles.)

    Traffic: the [V, H] head once (1.2 GB at 7B: the floor, 70% of an MCTP step; one row
    block for <= 128 rows); x from L2; argmax writes 8 bytes per row per block instead of 4V
    bytes of logits. Weight offsets are 64-bit: V * H * 2 bytes > 2^31 at 7B.
    """
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    ids = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    id_mask = ids < V
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    rows64 = rows.to(tl.int64)
    x_rows = x_ptr + rows64 * stride_xr
    rstd = _tl.row_rstd(x_rows, row_mask, H, eps, eps, norm_w_ptr, NORMS=0, BLOCK_K=STATS_K)
    w_rows = w_ptr + ids.to(tl.int64) * H
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    acc, _ = _tl.gemv_accumulate(acc, acc, x_rows, row_mask, w_rows, w_rows, id_mask, H, 0,
                                 rstd, norm_w_ptr, rstd, norm_w_ptr, NORMS=1, TWO=False, BLOCK_K=BLOCK_K)
    logits = _tl.round_to(acc, dtype)
    if WRITE_LOGITS:
        tl.store(out_ptr + rows64[:, None] * stride_or + ids[None, :], logits,
                 mask=row_mask[:, None] & id_mask[None, :])
    else:
        logits = tl.where(id_mask[None, :], logits, float("-inf"))
        is_nan = logits != logits
        first_nan = tl.min(tl.where(is_nan, ids[None, :], V), axis=1)
        plain = tl.where(is_nan, float("-inf"), logits)
        best = tl.max(plain, axis=1)
        first = tl.min(tl.where(plain == best[:, None], ids[None, :], V), axis=1)
        has_nan = first_nan < V
        best = tl.where(has_nan, float("nan"), best)
        first = tl.where(has_nan, first_nan, first)
        tl.store(out_ptr + rows64 * stride_or + pid_n, best, mask=row_mask)
        tl.store(idx_ptr + rows64 * stride_or + pid_n, first, mask=row_mask)


@triton.jit
def _argmax_reduce_kernel(val_ptr, idx_ptr, out_ptr, num_blocks, BLOCK: tl.constexpr):
    """out[r] = the id of the largest workspace value of row r, the lowest id among equals; a
    NaN value wins over every number (torch.argmax), the lowest id among NaNs.

    Blocks are in id order, so within a chunk the lowest id among the maxima wins and a later
    chunk replaces the running best only when strictly larger (or NaN while the best is not).
    Reads 8 bytes per block.
    """
    row = tl.program_id(0).to(tl.int64)
    best = float("-inf")
    best_id = 0
    best_nan = tl.full((), False, tl.int1)
    for b0 in range(0, num_blocks, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        mask = offs < num_blocks
        vals = tl.load(val_ptr + row * num_blocks + offs, mask=mask, other=float("-inf"))
        ids = tl.load(idx_ptr + row * num_blocks + offs, mask=mask, other=0)
        is_nan = vals != vals
        nan_id = tl.min(tl.where(is_nan, ids, 2147483647), axis=0)
        chunk_nan = nan_id < 2147483647
        plain = tl.where(is_nan, float("-inf"), vals)
        chunk_best = tl.max(plain, axis=0)
        chunk_id = tl.min(tl.where(plain == chunk_best, ids, 2147483647), axis=0)
        chunk_id = tl.where(chunk_nan, nan_id, chunk_id)
        take = ((chunk_best > best) | (b0 == 0) | chunk_nan) & ~best_nan
        best_id = tl.where(take, chunk_id, best_id)
        best = tl.where(take, chunk_best, best)
        best_nan = best_nan | chunk_nan
    tl.store(out_ptr + row, best_id.to(tl.int64))


# Workspace entries per step of the reduce (5253 blocks per row at 7B at R = 1: 6 steps). Tiny
# on the CPU (interpreter) so that the tests there cover the combine across steps.
_REDUCE_BLOCK = {"cuda": 1024, "cpu": 4}


def config(target: str, rows: int, vocab: int, hidden: int, write_logits: bool) -> dict:
    """Launch configuration of the head GEMV on `target` ("cuda", or "cpu": the interpreter)."""
    return dict(H=hidden, WRITE_LOGITS=write_logits, **_tl.gemv_config(target, rows, vocab, hidden, normed=True))


def _check(x, norm_weight, w_head):
    dtype = _tl.model_dtype("x", x)
    dev = x.device
    _tl.expect("w_head", w_head, ["V", "H"], dtype, dev, contiguous=True)
    vocab, hidden = w_head.shape
    _tl.expect("x", x, ["R", hidden], dtype, dev)
    _tl.expect("norm_weight", norm_weight, [hidden], dtype, dev, contiguous=True)
    return dtype, dev, x.shape[0], vocab, hidden


def plan(x: torch.Tensor, norm_weight: torch.Tensor, w_head: torch.Tensor, eps: float, out: torch.Tensor,
         write_logits: bool, target: str | None = None) -> list[_tl.Launch]:
    """The launches of head_logits (write_logits; `out` [R, V] fp32) or head_argmax (`out` [R]
    int64; allocates the [R, blocks] workspace) for validated, unit-stride tensors (meta
    tensors work)."""
    target = target or x.device.type
    rows, (vocab, hidden) = x.shape[0], w_head.shape
    cfg = config(target, rows, vocab, hidden, write_logits)
    blocks = triton.cdiv(vocab, cfg["BLOCK_N"])
    grid = (blocks, _tl.row_grid(rows, cfg["BLOCK_R"]))
    if write_logits:
        return [_tl.Launch(_head_kernel, grid, (x, norm_weight, w_head, out, out, rows, vocab, float(eps), x.stride(0),
                                                out.stride(0)), cfg)]
    best = torch.empty((rows, blocks), dtype=torch.float32, device=x.device)
    first = torch.empty((rows, blocks), dtype=torch.int32, device=x.device)
    return [_tl.Launch(_head_kernel, grid, (x, norm_weight, w_head, best, first, rows, vocab, float(eps), x.stride(0),
                                            blocks), cfg),
            _tl.Launch(_argmax_reduce_kernel, (rows,), (best, first, out, blocks),
                       dict(BLOCK=_REDUCE_BLOCK[target], num_warps=_tl.NUM_WARPS))]


def head_logits(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    w_head: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits = (rmsnorm(x) @ W_head^T).to(dtype).float(): the fused Triton head (= head_logits_ref).

    x: [R, H]; norm_weight: [H]; w_head: [V, H] contiguous; one dtype. Returns [R, V] fp32.
    Grid at 7B: 32-id blocks (5253 programs) at R = 1, 16-id at R = 2, 64-id tl.dot blocks beyond; one row
    block for up to 128 rows.
    """
    dtype, dev, rows, vocab, hidden = _check(x, norm_weight, w_head)
    if out is None:
        out = torch.empty((rows, vocab), dtype=torch.float32, device=dev)
    else:
        _tl.expect_out("out", out, [rows, vocab], torch.float32, dev)
    if rows and vocab:
        _tl.run_launches(plan(_tl.unit_stride(x), norm_weight, w_head, eps, out, write_logits=True))
    return out


def head_argmax(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    w_head: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """ids = argmax(head_logits(x)) (lowest id among equal maxima, NaN wins), no logits written (= head_argmax_ref).

    x: [R, H]; norm_weight: [H]; w_head: [V, H] contiguous; one dtype. Returns [R] int64.
    Two launches: the head GEMV leaves per-block (max, first id) in an [R, V / BLOCK_N]
    workspace, then one program per row reduces it; no atomics, so the result is deterministic.
    The workspace (8 bytes per vocabulary block: 42 KB per row at 7B, R = 1) is allocated per
    call: inside a CUDA graph capture it comes from the graph's private pool.
    """
    dtype, dev, rows, vocab, hidden = _check(x, norm_weight, w_head)
    if out is None:
        out = torch.empty((rows,), dtype=torch.int64, device=dev)
    else:
        _tl.expect_out("out", out, [rows], torch.int64, dev)
    if rows == 0 or vocab == 0:
        return out
    _tl.run_launches(plan(_tl.unit_stride(x), norm_weight, w_head, eps, out, write_logits=False))
    return out


def aot_launches() -> list[tuple[str, _tl.Launch]]:
    """(label, launch) at V = 168072, H = 3584 for every AOT row count: argmax (GEMV + reduce)
    and logits."""
    geom = GEOMETRIES["7b"]
    h, v = geom.hidden, geom.vocab
    meta = _tl.meta_tensor
    return [item for write_logits in (False, True) for item in _tl.aot_row_launches(
        "head_logits" if write_logits else "head_argmax", lambda rows, dtype, w=write_logits: plan(
            meta((rows, h), dtype), meta((h,), dtype), meta((v, h), dtype), geom.eps,
            meta((rows, v), torch.float32) if w else meta((rows,), torch.int64), w, target="cuda"))]


def _cases(geom: Geometry, dtype, device, gen) -> list[Case]:
    cases = []
    h, v = geom.hidden, geom.vocab
    for rows in sorted({1, min(geom.rows[-1], 3)}):
        kw = dict(x=randn((rows, h), dtype, device, gen, scale=2.0), norm_weight=norm_weight(h, dtype, device, gen),
                  w_head=weight((v, h), dtype, device, gen), eps=geom.eps)
        size = torch.finfo(dtype).bits // 8
        cases.append(Case(f"R{rows}-V{v}", kw, bytes_moved=size * (v * h + rows * h + h) + 8 * rows))
    return cases


SPEC_ARGMAX = OpSpec("head_argmax", head_argmax_ref, _cases, impls={"triton": head_argmax}, compare="argmax")
SPEC_LOGITS = OpSpec("head_logits", head_logits_ref, _cases, impls={"triton": head_logits})
