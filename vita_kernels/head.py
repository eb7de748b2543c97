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
    *,
    x_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits = (rmsnorm(x) @ W_head^T).to(dtype).float().

    x: [R, H] raw final hidden rows (with x_rows, int64 [R]: the rows x[x_rows] of a history);
    norm_weight: [H]; w_head: [V, H]. Returns [R, V] fp32 whose values are those of the model
    dtype (as Hugging Face generation sees them).
    """
    if x_rows is not None:
        x = x.index_select(0, x_rows)
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
    *,
    x_rows: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    token_index: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
    seen_rows: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """ids = argmax(head_logits(x)), the lowest id among equal maxima; a NaN logit wins (the
    lowest id among NaNs), as torch.argmax decides. Returns [R] int64.

    The emit epilogue of a decode step, each part optional: tokens[token_index[r]] = ids[r]
    (tokens: an int64 token buffer) and seen[seen_rows[r], ids[r]] = True (seen: [B, V] bool
    masks). counters: the fused kernel's arrival counters (int32), unused here.
    """
    ids = head_logits_ref(x, norm_weight, w_head, eps, x_rows=x_rows).argmax(dim=-1)
    write_emitted(ids, tokens, token_index, seen, seen_rows)
    if out is not None:
        out.copy_(ids)
        return out
    return ids


def write_emitted(ids: torch.Tensor, tokens: torch.Tensor | None, token_index: torch.Tensor | None,
                  seen: torch.Tensor | None, seen_rows: torch.Tensor | None) -> None:
    """The emit epilogue with torch ops: tokens[token_index[r]] = ids[r] and seen[seen_rows[r],
    ids[r]] = True, each where given (the fused head does both in its kernel)."""
    if tokens is not None:
        tokens.index_copy_(0, token_index, ids)
    if seen is not None:
        seen.index_put_((seen_rows, ids), torch.ones((), dtype=torch.bool, device=seen.device))


@triton.jit
def argmax_of_blocks(val_ptr, idx_ptr, rows64, row_mask, num_blocks, BLOCK: tl.constexpr):
    """Per row: the id of the largest workspace value (blocks [row, 0..num_blocks)), the lowest
    id among equals; a NaN value wins over every number (torch.argmax), the lowest id among NaNs.

    Each lane keeps its own running best over the chunks (blocks come in id order, so a lane
    replaces its best only when strictly larger, and keeps its first NaN); the lanes are reduced
    once after the loop, with no cross-lane work inside it. Reads 8 bytes per block, bypassing
    L1 (the blocks were written by other programs).
    """
    NONE: tl.constexpr = 2147483647
    best = tl.full([rows64.shape[0], BLOCK], float("-inf"), tl.float32)
    best_id = tl.full([rows64.shape[0], BLOCK], NONE, tl.int32)
    nan_id = tl.full([rows64.shape[0], BLOCK], NONE, tl.int32)
    for b0 in range(0, num_blocks, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (offs < num_blocks)[None, :]
        at = rows64[:, None] * num_blocks + offs[None, :]
        vals = tl.load(val_ptr + at, mask=mask, other=float("-inf"), cache_modifier=".cg")
        ids = tl.load(idx_ptr + at, mask=mask, other=0, cache_modifier=".cg")
        is_nan = vals != vals
        nan_id = tl.where(is_nan & (nan_id == NONE), ids, nan_id)
        take = mask & ~is_nan & ((vals > best) | (best_id == NONE))
        best_id = tl.where(take, ids, best_id)
        best = tl.where(take, vals, best)
    first_nan = tl.min(nan_id, axis=1)
    top = tl.max(best, axis=1)
    chosen = tl.min(tl.where(best == top[:, None], best_id, NONE), axis=1)
    return tl.where(first_nan < NONE, first_nan, chosen).to(tl.int64)


@triton.jit
def _head_kernel(x_ptr, x_rows_ptr, norm_w_ptr, w_ptr, out_ptr, val_ptr, idx_ptr, counter_ptr, tokens_ptr,
                 token_index_ptr, seen_ptr, seen_rows_ptr, R, V, eps, stride_xr, stride_or,
                 H: tl.constexpr, WRITE_LOGITS: tl.constexpr, X_ROWS: tl.constexpr, EMIT_TOKENS: tl.constexpr,
                 EMIT_SEEN: tl.constexpr, REDUCE_BLOCK: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STATS_K: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    """One program: rows [pid_r * BLOCK_R, +BLOCK_R) x vocabulary ids [pid_n * BLOCK_N, +BLOCK_N).

    WRITE_LOGITS: out[r, id] = the logit (fp32 holding a model-dtype value). Otherwise each
    program leaves its block's (max logit, lowest id reaching it) in the [R, num_blocks]
    workspace, and the row block's last program to arrive reduces the whole row (in id order:
    deterministic, whoever arrives last) into out[r], then, when asked, writes the id into the
    token buffer (EMIT_TOKENS) and marks it in the row's seen mask (EMIT_SEEN): a greedy decode
    step's whole emit in this one launch. Logits are compared after rounding to the model
    dtype, as the reference's are, so ties and their lowest-id resolution match it. A NaN logit
    wins, as in torch.argmax. X_ROWS reads x rows through x_rows (the last rows of each
    sequence, straight from the hidden history). (SPLIT_K is always 1: V gives enough tiles.)

    Traffic: the [V, H] head once (1.2 GB at 7B: the floor, 70% of an MCTP step; one row
    block for <= 128 rows); x from L2; argmax writes 8 bytes per row per block instead of 4V
    bytes of logits, read once more by the last program. Weight offsets are 64-bit: V * H * 2
    bytes > 2^31 at 7B.
    """
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    ids = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    id_mask = ids < V
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    rows64 = rows.to(tl.int64)
    x_at = rows64
    if X_ROWS:
        x_at = tl.load(x_rows_ptr + rows64, mask=row_mask, other=0)
    x_rows = x_ptr + x_at * stride_xr
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
        num_blocks = tl.num_programs(0)
        logits = tl.where(id_mask[None, :], logits, float("-inf"))
        is_nan = logits != logits
        first_nan = tl.min(tl.where(is_nan, ids[None, :], V), axis=1)
        plain = tl.where(is_nan, float("-inf"), logits)
        best = tl.max(plain, axis=1)
        first = tl.min(tl.where(plain == best[:, None], ids[None, :], V), axis=1)
        has_nan = first_nan < V
        best = tl.where(has_nan, float("nan"), best)
        first = tl.where(has_nan, first_nan, first)
        tl.store(val_ptr + rows64 * num_blocks + pid_n, best, mask=row_mask)
        tl.store(idx_ptr + rows64 * num_blocks + pid_n, first, mask=row_mask)
        if _tl.last_to_arrive(counter_ptr + tl.program_id(1), num_blocks):
            chosen = argmax_of_blocks(val_ptr, idx_ptr, rows64, row_mask, num_blocks, REDUCE_BLOCK)
            tl.store(out_ptr + rows64 * stride_or, chosen, mask=row_mask)
            if EMIT_TOKENS:
                slot = tl.load(token_index_ptr + rows64, mask=row_mask, other=0)
                tl.store(tokens_ptr + slot, chosen, mask=row_mask)
            if EMIT_SEEN:
                seen_row = tl.load(seen_rows_ptr + rows64, mask=row_mask, other=0)
                tl.store(seen_ptr + seen_row * V + chosen, tl.full(rows64.shape, 1, tl.int1), mask=row_mask)


# Workspace entries per step of the reduction, over all the program's rows (three running
# [BLOCK_R, entries / BLOCK_R] arrays: 24 registers per thread at 4 warps; 5253 blocks per row
# at 7B: 6 steps at R = 1, 83 at 16 rows). Tiny on the CPU (interpreter) so that the tests there
# cover the combine across steps.
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
         write_logits: bool, x_rows=None, tokens=None, token_index=None, seen=None, seen_rows=None, counters=None,
         target: str | None = None) -> list[_tl.Launch]:
    """The launch of head_logits (write_logits; `out` [R, V] fp32) or head_argmax (`out` [R]
    int64; allocates the [R, blocks] workspace) for validated, unit-stride tensors (meta
    tensors work)."""
    target = target or x.device.type
    rows, (vocab, hidden) = out.shape[0], w_head.shape
    cfg = config(target, rows, vocab, hidden, write_logits)
    blocks = triton.cdiv(vocab, cfg["BLOCK_N"])
    grid = (blocks, _tl.row_grid(rows, cfg["BLOCK_R"]))
    best, first = out, out
    if not write_logits:
        best = torch.empty((rows, blocks), dtype=torch.float32, device=x.device)
        first = torch.empty((rows, blocks), dtype=torch.int32, device=x.device)
        arrivals = _tl.counters_for(grid[1], counters, x.device)
    else:
        arrivals = out  # placeholder: logits need no reduction
    flags = dict(X_ROWS=x_rows is not None, EMIT_TOKENS=tokens is not None, EMIT_SEEN=seen is not None,
                 REDUCE_BLOCK=max(2, _REDUCE_BLOCK[target] // cfg["BLOCK_R"]))
    unused = out
    return [_tl.Launch(_head_kernel, grid,
                       (x, x_rows if x_rows is not None else unused, norm_weight, w_head, out, best, first, arrivals,
                        tokens if tokens is not None else unused, token_index if token_index is not None else unused,
                        seen if seen is not None else unused, seen_rows if seen_rows is not None else unused,
                        rows, vocab, float(eps), x.stride(0), out.stride(0)),
                       {**flags, **cfg})]


def _check_rows(x, x_rows, hidden, dev) -> int:
    """Rows of the head's input: x itself, or x[x_rows] of a history."""
    if x_rows is None:
        return x.shape[0]
    _tl.expect("x_rows", x_rows, ["R"], torch.int64, dev, contiguous=True)
    return x_rows.shape[0]


def head_logits(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    w_head: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    *,
    x_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits = (rmsnorm(x) @ W_head^T).to(dtype).float(): the fused Triton head (= head_logits_ref).

    x: [R, H] (or a history read through x_rows, int64 [R]); norm_weight: [H]; w_head: [V, H]
    contiguous; one dtype. Returns [R, V] fp32. Grid at 7B: 32-id blocks (5253 programs) at R =
    1, 16-id at R = 2, 64-id tl.dot blocks beyond; one row block for up to 128 rows.
    """
    dtype, dev, _, vocab, hidden = _check(x, norm_weight, w_head)
    rows = _check_rows(x, x_rows, hidden, dev)
    if out is None:
        out = torch.empty((rows, vocab), dtype=torch.float32, device=dev)
    else:
        _tl.expect_out("out", out, [rows, vocab], torch.float32, dev)
    if rows and vocab:
        _tl.run_launches(plan(_tl.unit_stride(x), norm_weight, w_head, eps, out, write_logits=True, x_rows=x_rows))
    return out


def head_argmax(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    w_head: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    *,
    x_rows: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    token_index: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
    seen_rows: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """ids = argmax(head_logits(x)) (lowest id among equal maxima, NaN wins), no logits written (= head_argmax_ref).

    x: [R, H] (or a history read through x_rows, int64 [R]); norm_weight: [H]; w_head: [V, H]
    contiguous; one dtype. Returns [R] int64. Emit epilogue (optional): tokens[token_index[r]] =
    ids[r] (tokens int64, token_index int64 [R]) and seen[seen_rows[r], ids[r]] = True (seen:
    [B, V] bool, seen_rows int64 [R]). One launch: each program leaves its vocabulary block's
    (max, first id) in an [R, V / BLOCK_N] workspace (8 bytes per block: 42 KB per row at 7B,
    R = 1, allocated per call: inside a CUDA graph capture from the graph's private pool), and
    the row block's last program reduces it in id order: deterministic, no atomics on data.
    counters: arrival counters (int32, zeroed, left zeroed; default: a fresh zeroed buffer).
    """
    dtype, dev, _, vocab, hidden = _check(x, norm_weight, w_head)
    rows = _check_rows(x, x_rows, hidden, dev)
    if out is None:
        out = torch.empty((rows,), dtype=torch.int64, device=dev)
    else:
        _tl.expect_out("out", out, [rows], torch.int64, dev)
    if (tokens is None) != (token_index is None) or (seen is None) != (seen_rows is None):
        raise ValueError("tokens and token_index, and seen and seen_rows, go together")
    if tokens is not None:
        _tl.expect("tokens", tokens, ["T"], torch.int64, dev, contiguous=True)
        _tl.expect("token_index", token_index, [rows], torch.int64, dev, contiguous=True)
    if seen is not None:
        _tl.expect("seen", seen, ["B", vocab], torch.bool, dev, contiguous=True)
        _tl.expect("seen_rows", seen_rows, [rows], torch.int64, dev, contiguous=True)
    if rows == 0 or vocab == 0:
        return out
    _tl.run_launches(plan(_tl.unit_stride(x), norm_weight, w_head, eps, out, False, x_rows, tokens, token_index,
                          seen, seen_rows, counters))
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
