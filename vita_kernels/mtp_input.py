"""MCTP module input: embedding gather + both RMSNorms + the input projection.

u = W_proj @ concat(RMSNorm_emb(E[ids]), RMSNorm_hid(norm(v)))   (embedding half first)

`v` is the raw (pre-final-norm) output of the previous stage; the shared final norm is applied
here, in the consumer, so no stage has to write a normalised copy of every row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vita_kernels import _tl
from vita_kernels.linear import split_k_buffers, split_k_sum
from vita_kernels.norm import rmsnorm_ref
from vita_kernels.registry import GEOMETRIES, Case, Geometry, OpSpec, norm_weight, randn, weight


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
    *,
    id_rows: torch.Tensor | None = None,
    hidden_rows: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """u = W_proj @ [rmsnorm(E[ids], w_emb) ; rmsnorm(rmsnorm(hidden, w_final), w_hid)].

    ids: [R] int64 in [0, V); embed: [V, H]; hidden: [R, H] raw previous-stage output;
    norm weights: [H]; w_proj: [H, 2H]. Returns [R, H] in the model dtype. Gathers: with
    id_rows (int64 [R]) the ids are ids[id_rows] (ids: a token buffer of any length); with
    hidden_rows (int64 [R]) the hidden rows are hidden[hidden_rows] (hidden: a history of any
    number of rows). counters: the fused kernel's split-K arrival counters, unused here.
    """
    if id_rows is not None:
        ids = ids.index_select(0, id_rows)
    if hidden_rows is not None:
        hidden = hidden.index_select(0, hidden_rows)
    e = rmsnorm_ref(embed.index_select(0, ids), emb_norm_weight, eps)
    h = rmsnorm_ref(rmsnorm_ref(hidden, final_norm_weight, eps), hid_norm_weight, eps)
    u = F.linear(torch.cat([e, h], dim=-1), w_proj)
    if out is not None:
        out.copy_(u)
        return out
    return u


@triton.jit
def _mtp_input_kernel(ids_ptr, id_rows_ptr, embed_ptr, hidden_ptr, hidden_rows_ptr, final_w_ptr, emb_w_ptr,
                      hid_w_ptr, w_ptr, out_ptr, part_ptr, counter_ptr, R, V, eps, stride_hr, stride_or,
                      H: tl.constexpr, ID_ROWS: tl.constexpr, HIDDEN_ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STATS_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """One program: rows [pid_r * BLOCK_R, +BLOCK_R) x output columns [pid_n * BLOCK_N, +BLOCK_N)
    x (SPLIT_K > 1) one K range of 2H / SPLIT_K columns, inside one half.

    The concat is never built: K in [0, H) multiplies rmsnorm(E[ids], w_emb) by W_proj[:, :H],
    K in [H, 2H) multiplies rmsnorm(rmsnorm(hidden, w_final), w_hid) by W_proj[:, H:]. Row
    statistics: the embedding rows, the raw hidden rows, then the rounded first norm's output.
    SPLIT_K > 1 writes fp32 partials; each tile's last program sums them and rounds
    (`split_k_sum`). ID_ROWS / HIDDEN_ROWS gather the ids and hidden rows through row indices
    (the token buffer and the hidden history of the runtime), so no gathered copy is made.

    Traffic: W_proj once (2 H^2 elements, 51 MB at 7B: the floor), R embedding rows gathered
    straight from E (no gathered copy), R hidden rows and three norm weights from L2, R * H
    outputs. Neither normalised half nor the concat is ever written.
    """
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < H
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    id_at = rows
    if ID_ROWS:
        id_at = tl.load(id_rows_ptr + rows, mask=row_mask, other=0)
    ids = tl.load(ids_ptr + id_at, mask=row_mask, other=0)
    emb_mask = row_mask & (ids >= 0) & (ids < V)  # an out-of-range id reads a zero row, never out of bounds
    emb_rows = embed_ptr + ids.to(tl.int64) * H  # 64-bit: V * H can exceed 2^31 elements
    hid_at = rows
    if HIDDEN_ROWS:
        hid_at = tl.load(hidden_rows_ptr + rows, mask=row_mask, other=0)
    hid_rows = hidden_ptr + hid_at.to(tl.int64) * stride_hr
    rstd_emb = _tl.row_rstd(emb_rows, emb_mask, H, eps, eps, emb_w_ptr, NORMS=0, BLOCK_K=STATS_K)
    rstd_final = _tl.row_rstd(hid_rows, row_mask, H, eps, eps, final_w_ptr, NORMS=0, BLOCK_K=STATS_K)
    rstd_hid = _tl.row_rstd(hid_rows, row_mask, H, eps, rstd_final, final_w_ptr, NORMS=1, BLOCK_K=STATS_K)
    w_rows = w_ptr + n.to(tl.int64) * (2 * H)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    if SPLIT_K == 1:
        acc, _ = _tl.gemv_accumulate(acc, acc, emb_rows, emb_mask, w_rows, w_rows, n_mask, H, 0,
                                     rstd_emb, emb_w_ptr, rstd_emb, emb_w_ptr, NORMS=1, TWO=False, BLOCK_K=BLOCK_K)
        acc, _ = _tl.gemv_accumulate(acc, acc, hid_rows, row_mask, w_rows, w_rows, n_mask, H, H,
                                     rstd_final, final_w_ptr, rstd_hid, hid_w_ptr, NORMS=2, TWO=False,
                                     BLOCK_K=BLOCK_K)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_or + n[None, :], _tl.round_to(acc, dtype),
                 mask=row_mask[:, None] & n_mask[None, :])
    else:
        HALF_SPLITS: tl.constexpr = SPLIT_K // 2
        K_SPLIT: tl.constexpr = H // HALF_SPLITS
        pid_k = tl.program_id(2)
        k_lo = (pid_k % HALF_SPLITS) * K_SPLIT
        if pid_k < HALF_SPLITS:
            acc, _ = _tl.gemv_accumulate(acc, acc, emb_rows + k_lo, emb_mask, w_rows, w_rows, n_mask, K_SPLIT, k_lo,
                                         rstd_emb, emb_w_ptr + k_lo, rstd_emb, emb_w_ptr + k_lo, NORMS=1, TWO=False,
                                         BLOCK_K=BLOCK_K)
        else:
            acc, _ = _tl.gemv_accumulate(acc, acc, hid_rows + k_lo, row_mask, w_rows, w_rows, n_mask, K_SPLIT,
                                         H + k_lo, rstd_final, final_w_ptr + k_lo, rstd_hid, hid_w_ptr + k_lo,
                                         NORMS=2, TWO=False, BLOCK_K=BLOCK_K)
        last, acc = split_k_sum(part_ptr, counter_ptr, acc, rows, row_mask, n, n_mask, R, H, SPLIT_K)
        if last:
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_or + n[None, :], _tl.round_to(acc, dtype),
                     mask=row_mask[:, None] & n_mask[None, :])


def config(target: str, rows: int, hidden: int) -> dict:
    """Launch configuration of `mtp_input` on `target` ("cuda", or "cpu": the interpreter).
    Split-K ranges never straddle the two halves (split_align = H)."""
    return dict(H=hidden, **_tl.gemv_config(target, rows, hidden, 2 * hidden, split_align=hidden, normed=True))


def plan(ids, embed, hidden, final_norm_weight, emb_norm_weight, hid_norm_weight, w_proj, eps, out,
         id_rows=None, hidden_rows=None, counters=None, target: str | None = None) -> list[_tl.Launch]:
    """The launch `mtp_input` issues for validated tensors (meta tensors work). Allocates the
    split-K partials."""
    target = target or hidden.device.type
    rows, (vocab, size) = out.shape[0], embed.shape
    cfg = config(target, rows, size)
    split_k = cfg["SPLIT_K"]
    grid = (triton.cdiv(size, cfg["BLOCK_N"]), _tl.row_grid(rows, cfg["BLOCK_R"]), split_k)
    partials, arrivals = split_k_buffers(grid, rows, size, counters, ids)
    return [_tl.Launch(_mtp_input_kernel, grid,
                       (ids, id_rows if id_rows is not None else ids, embed, hidden,
                        hidden_rows if hidden_rows is not None else ids, final_norm_weight, emb_norm_weight,
                        hid_norm_weight, w_proj, out, partials, arrivals, rows, vocab, float(eps), hidden.stride(0),
                        out.stride(0)),
                       dict(ID_ROWS=id_rows is not None, HIDDEN_ROWS=hidden_rows is not None, **cfg))]


def mtp_input(
    ids: torch.Tensor,
    embed: torch.Tensor,
    hidden: torch.Tensor,
    final_norm_weight: torch.Tensor,
    emb_norm_weight: torch.Tensor,
    hid_norm_weight: torch.Tensor,
    w_proj: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    *,
    id_rows: torch.Tensor | None = None,
    hidden_rows: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """u = W_proj @ [rmsnorm(E[ids], w_emb) ; rmsnorm(rmsnorm(hidden, w_final), w_hid)]: one Triton GEMV.

    ids: [R] int64 in [0, V) (checked on the device: an id outside reads a zero embedding, as
    a host check would synchronise); embed: [V, H] contiguous; hidden: [R, H] raw
    previous-stage output; norm weights: [H]; w_proj: [H, 2H] contiguous; one float dtype.
    id_rows / hidden_rows (int64 [R]): gather ids[id_rows] from a token buffer and
    hidden[hidden_rows] from a history inside the kernel. counters: split-K arrival counters
    (int32, zeroed, left zeroed; default: a fresh zeroed buffer). Returns [R, H]
    (= mtp_input_ref). One launch. Grid at 7B: 4-column blocks (896 programs) at R <= 2;
    16-column tl.dot blocks split four ways along K (896 programs, each tile's last program
    summing the partials) at R = 3..16; one row block for up to 128 rows (split along K as
    `_tl.gemv_config` decides).
    """
    dtype = _tl.model_dtype("hidden", hidden)
    dev = hidden.device
    _tl.expect("embed", embed, ["V", "H"], dtype, dev, contiguous=True)
    vocab, size = embed.shape
    _tl.expect("hidden", hidden, ["R" if hidden_rows is None else "S", size], dtype, dev)
    if id_rows is not None:
        _tl.expect("id_rows", id_rows, ["R"], torch.int64, dev, contiguous=True)
        _tl.expect("ids", ids, ["T"], torch.int64, dev, contiguous=True)
        rows = id_rows.shape[0]
    else:
        _tl.expect("ids", ids, ["R"], torch.int64, dev)
        rows = ids.shape[0]
    if hidden_rows is not None:
        _tl.expect("hidden_rows", hidden_rows, [rows], torch.int64, dev, contiguous=True)
    else:
        _tl.expect("hidden", hidden, [rows, size], dtype, dev)
    for name, w in (("final_norm_weight", final_norm_weight), ("emb_norm_weight", emb_norm_weight),
                    ("hid_norm_weight", hid_norm_weight)):
        _tl.expect(name, w, [size], dtype, dev, contiguous=True)
    _tl.expect("w_proj", w_proj, [size, 2 * size], dtype, dev, contiguous=True)
    if out is None:
        out = torch.empty((rows, size), dtype=dtype, device=dev)
    else:
        _tl.expect_out("out", out, [rows, size], dtype, dev)
    if rows == 0 or size == 0:
        return out
    _tl.run_launches(plan(ids.contiguous(), embed, _tl.unit_stride(hidden), final_norm_weight, emb_norm_weight,
                          hid_norm_weight, w_proj, eps, out, id_rows, hidden_rows, counters))
    return out


def aot_launches() -> list[tuple[str, _tl.Launch]]:
    """(label, launch) at H = 3584 for every AOT row count."""
    geom = GEOMETRIES["7b"]
    h = geom.hidden
    meta = _tl.meta_tensor
    return _tl.aot_row_launches("mtp_input", lambda rows, dtype: plan(
        meta((rows,), torch.int64), meta((geom.vocab, h), dtype), meta((rows, h), dtype), meta((h,), dtype),
        meta((h,), dtype), meta((h,), dtype), meta((h, 2 * h), dtype), geom.eps, meta((rows, h), dtype),
        target="cuda"))


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


SPEC = OpSpec("mtp_input", mtp_input_ref, _cases, impls={"triton": mtp_input})
