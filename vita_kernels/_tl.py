"""Shared pieces of the fused GEMV kernels: Triton device helpers and launcher-side checks.

Every projection at batch 1 is a GEMV over a large weight, so each kernel has the same shape:
a program owns BLOCK_R activation rows x BLOCK_N weight rows (or two such sets of weight rows:
gate and up, or the two rotate-half partners of a head), streams the weight tile by tile along
K exactly once, and builds the activation chunk it multiplies on the fly (raw, RMS-normalised, or
normalised twice) from rows that stay in L2. The helpers below are that common core:

- `round_to`: fp32 -> the model dtype (round to nearest even) and back, the reference's
  rounding points. The CPU interpreter truncates fp32 -> bf16, so there it rounds on the bits.
- `apply_rmsnorm`, `load_normed`, `row_rstd`: Qwen2's RMSNorm `w * (x * rstd).to(dtype)`
  with the reference's two roundings.
- `tile_dot`: acc[R, N] += X[R, K] @ W[N, K]^T on tensor cores (tl.dot) for >= 16 padded rows.
- `gemv_accumulate`: the K loop over one or two weight row sets. With 1 or 2 rows it keeps a
  [BLOCK_R, BLOCK_N, BLOCK_K] fp32 accumulator of per-lane products and reduces over K once,
  after the loop: no cross-lane shuffle inside the loop, which is then loads + FMAs only.

The Python half validates launcher arguments with errors that name the argument, picks the
launch configuration (`gemv_config`: row block up to 128 rows so that a prefill chunk of up to
128 rows streams every weight once, block sizes, warps, pipeline stages, split-K) and describes
each launch as a `Launch` (kernel, grid, arguments) that the launchers run and that the AOT
build and the geometry tests inspect without a GPU.
"""
from __future__ import annotations

import os

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from vita_kernels.backend import triton_runs_on

# Under the interpreter, bf16 values are raw bits and fp32 -> bf16 casts truncate: kernels keep
# values in fp32 there and `round_to` rounds on the bits. Compiled kernels never see this flag.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

# Programs wanted per launch at batch 1: 4 per SM on a 132-SM H100 keeps every SM streaming
# weight tiles with a few loads in flight even where programs finish unevenly. The CPU
# interpreter runs programs one after another (~5-10 ms each): there a handful, which still
# exercises every multi-block and tail path, is the right number.
SMS = 132  # H100 / H200
TARGET_PROGRAMS = {"cuda": 4 * SMS, "cpu": 8}


def sm_balance(programs: int) -> float:
    """Mean programs per SM over the busiest SM's count: the fraction of the streaming time in
    which every SM is busy (1.0 when programs divide evenly over the 132 SMs)."""
    per_sm = programs / SMS
    return per_sm / -(-programs // SMS)
# fp32 products one program holds per K step on the broadcast path (64 registers per thread at
# 4 warps): bounds BLOCK_R * BLOCK_N * BLOCK_K.
BROADCAST_TILE = 8192
NUM_WARPS = 4  # the broadcast path's warps (and qkv_rope's); also triton.compile's default
# The largest row block: one program multiplies up to 128 activation rows by its weight tile,
# so any step of <= 128 rows reads each weight element once. Beyond that a row grid axis
# re-streams the weights once per 128 rows (a 512-row prefill reads them 4 times).
MAX_BLOCK_R = 128


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 `x` rounded to `dtype` (nearest even), returned as fp32 values: the reference's
    rounding points (identity for fp32)."""
    if dtype == tl.float32:
        return x
    elif INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def apply_rmsnorm(x, rstd, w, dtype: tl.constexpr):
    """Qwen2 RMSNorm of fp32 `x` given its (broadcastable) `rstd` and fp32 weight `w`:
    round(w * round(x * rstd)), as `weight * (x * rstd).to(dtype)` rounds."""
    return round_to(w * round_to(x * rstd, dtype), dtype)


@triton.jit
def load_normed(x_rows, row_mask, cols, col_mask, rstd_a, w_a_ptr, rstd_b, w_b_ptr, NORMS: tl.constexpr):
    """Chunk x[:, cols] of the rows at `x_rows` ([BLOCK_R] pointers), fp32 values of the model dtype.

    NORMS = 0: x itself; 1: rmsnorm(x, w_a) with row statistics rstd_a; 2: then
    rmsnorm(., w_b) with rstd_b (the statistics of the first norm's rounded output).
    Masked rows and columns read as 0 and stay 0 (their weights are 0).
    """
    dtype: tl.constexpr = x_rows.dtype.element_ty
    x = tl.load(x_rows[:, None] + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    x = x.to(tl.float32)
    if NORMS >= 1:
        w_a = tl.load(w_a_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        x = apply_rmsnorm(x, rstd_a[:, None], w_a[None, :], dtype)
    if NORMS >= 2:
        w_b = tl.load(w_b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        x = apply_rmsnorm(x, rstd_b[:, None], w_b[None, :], dtype)
    return x


@triton.jit
def row_rstd(x_rows, row_mask, K: tl.constexpr, eps, rstd_a, w_a_ptr, NORMS: tl.constexpr, BLOCK_K: tl.constexpr):
    """rsqrt(mean(y^2) + eps) per row, y = load_normed(x, NORMS) over all K columns, in fp32.

    Reads R x K activations from L2 (every program of a launch reads the same rows): at the 7B
    shapes 1.5% (head, gate_up) to ~12% (BLOCK_N = 8 projections) of the weight bytes the
    program streams from DRAM, and L2 serves them several times faster than DRAM.
    """
    acc = tl.zeros([x_rows.shape[0], BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        y = load_normed(x_rows, row_mask, cols, cols < K, rstd_a, w_a_ptr, rstd_a, w_a_ptr, NORMS)
        acc += y * y
    return tl.rsqrt(tl.sum(acc, axis=1) / K + eps)


@triton.jit
def last_to_arrive(counter_ptr, expected):
    """Count this program's arrival at `counter_ptr` (int32); True for the last of `expected`
    programs sharing it, which then owns the reduction of their partials (and resets the counter
    to 0 for the next launch: counters are never cleared by a launch of their own).

    The barrier orders every thread's partial stores before the arrival; the acq_rel atomic at
    GPU scope publishes them and, for the last program, makes the others' visible. Programs of
    one launch share a counter only within their reduction group; launches on one stream run
    one after another, so consecutive launches may reuse the same counters.
    """
    tl.debug_barrier()
    old = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = old == expected - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return last


def counters_for(groups: int, counters: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The arrival counters of a launch with `groups` reduction groups: the caller's persistent,
    zeroed int32 buffer (the runtime keeps one per workspace, so a step launches no memset), or
    a fresh zeroed one."""
    if counters is None:
        return torch.zeros(max(groups, 1), dtype=torch.int32, device=device)
    if counters.dtype != torch.int32 or counters.device != torch.device(device) or counters.numel() < groups:
        raise ValueError(f"counters must be an int32 tensor of at least {groups} elements on {device}, got "
                         f"{counters.dtype} [{counters.numel()}] on {counters.device}")
    return counters


@triton.jit
def tile_dot(acc, x, w):
    """acc[BR, BN] += x[BR, BK] @ w[BN, BK]^T in fp32 on tensor cores (BR >= 16 padded rows).

    x: fp32 values already rounded to the model dtype; w: a weight tile as loaded. The product
    runs in the model dtype (exact, since x is already rounded; fp32 models use IEEE fp32, not
    TF32). The interpreter gets fp32 operands: its bf16 arithmetic is garbage, and its fp32 dot
    is exact.
    """
    if INTERPRET:
        a = x
        b = w.to(tl.float32)
    else:
        a = x.to(w.dtype)
        b = w
    if a.dtype == tl.float32:
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def load_weight(w_rows, cols, n_mask, col_mask, EVEN_K: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] weight tile at columns `cols` of the rows at `w_rows`.

    Weights are streamed once per step and never reused, so they are loaded evict-first: the
    activations, norm weights and split-K partials that every program re-reads keep the L2.
    EVEN_K (BLOCK_K divides the K range): no column mask, so the only mask is per weight row and
    is constant along the row, which lets the compiler emit 16-byte vector loads.
    """
    if EVEN_K:
        mask = n_mask[:, None]
    else:
        mask = n_mask[:, None] & col_mask[None, :]
    return tl.load(w_rows[:, None] + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")


@triton.jit
def gemv_accumulate(acc_a, acc_b, x_rows, row_mask, w_rows_a, w_rows_b, n_mask, K: tl.constexpr, w_k0,
                    rstd_a, w_a_ptr, rstd_b, w_b_ptr, NORMS: tl.constexpr, TWO: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """acc_a += X @ W_a[:, w_k0:w_k0+K]^T (and acc_b with W_b when TWO), X = load_normed(x, NORMS).

    acc_a/b: [BLOCK_R, BLOCK_N] fp32; w_rows_a/b: [BLOCK_N] pointers to weight rows (64-bit
    offsets computed by the caller). Each weight element is read exactly once; the activation
    chunk is built once per K step and shared by both weight tiles.

    BLOCK_R >= 16: tl.dot per K step. BLOCK_R < 16 (the decode GEMV): each lane keeps its own
    fp32 products in a [BLOCK_R, BLOCK_N, BLOCK_K] accumulator, so the K loop is vector loads
    and FMAs only; the reduction over K (the only cross-lane shuffles) runs once, after the loop.
    """
    BLOCK_R: tl.constexpr = acc_a.shape[0]
    BLOCK_N: tl.constexpr = acc_a.shape[1]
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    if BLOCK_R >= 16:
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_mask = cols < K
            x = load_normed(x_rows, row_mask, cols, col_mask, rstd_a, w_a_ptr, rstd_b, w_b_ptr, NORMS)
            acc_a = tile_dot(acc_a, x, load_weight(w_rows_a, w_k0 + cols, n_mask, col_mask, EVEN_K))
            if TWO:
                acc_b = tile_dot(acc_b, x, load_weight(w_rows_b, w_k0 + cols, n_mask, col_mask, EVEN_K))
    else:
        wide_a = tl.zeros([BLOCK_R, BLOCK_N, BLOCK_K], dtype=tl.float32)
        wide_b = tl.zeros([BLOCK_R, BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_mask = cols < K
            x = load_normed(x_rows, row_mask, cols, col_mask, rstd_a, w_a_ptr, rstd_b, w_b_ptr, NORMS)[:, None, :]
            w_a = load_weight(w_rows_a, w_k0 + cols, n_mask, col_mask, EVEN_K).to(tl.float32)
            wide_a += x * w_a[None, :, :]
            if TWO:
                w_b = load_weight(w_rows_b, w_k0 + cols, n_mask, col_mask, EVEN_K).to(tl.float32)
                wide_b += x * w_b[None, :, :]
        acc_a += tl.sum(wide_a, axis=2)
        if TWO:
            acc_b += tl.sum(wide_b, axis=2)
    return acc_a, acc_b


# ----------------------------------------------------------------------------- launch helpers


def row_block(rows: int) -> int:
    """Activation rows per program of `gemv_blocks`: 1, 2 or 4 on the broadcast path; 16
    (tl.dot) beyond 4 rows.

    More than 16 rows (prefill) take several row blocks, each streaming the weight again; the
    read-once launchers use `gemv_row_block` / `gemv_config` instead.
    """
    if rows <= 4:
        return triton.next_power_of_2(max(rows, 1))
    return 16


def gemv_blocks(device_type: str, rows: int, n: int, k: int, tiles: int = 1, min_block_n: int = 8) -> dict:
    """BLOCK_R / BLOCK_N / BLOCK_K for a GEMV of `rows` rows over an [n, k] weight, in row
    tiles of at most 16 (`row_block`), launched with NUM_WARPS and the default pipeline.

    `tiles`: weight tiles per K step (2 for gate+up or the rotate-half pairs). BLOCK_N is the
    largest of 64..min_block_n that still gives TARGET_PROGRAMS[device_type] programs; the broadcast path
    bounds its [R, N, K] product tile by BROADCAST_TILE, preferring K steps of >= 128 (long
    contiguous weight-row segments) over a wide BLOCK_N; tl.dot needs BLOCK_N >= 16.
    """
    block_r = row_block(rows)
    lowest = max(min_block_n, 16) if block_r >= 16 else min_block_n
    block_n = 64
    while block_n > lowest and triton.cdiv(n, block_n) < TARGET_PROGRAMS[device_type]:
        block_n //= 2
    block_n = max(lowest, min(block_n, triton.next_power_of_2(n)))
    if block_r >= 16:
        block_k = 128
    else:
        # Keep K steps >= 128 (256 B per weight row) by trading BLOCK_N for rows and tiles.
        while block_n > min_block_n and BROADCAST_TILE // (block_r * block_n * tiles) < 128:
            block_n //= 2
        block_k = max(32, min(1024, BROADCAST_TILE // (block_r * block_n * tiles)))
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    return dict(BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_K=block_k)


def gemv_row_block(rows: int) -> int:
    """Activation rows per program for the read-once launchers: 1 or 2 on the broadcast path;
    16, 32, 64 or 128 (tl.dot) from 3 rows on, so one program covers up to 128 rows.

    Why tl.dot already at 3-4 rows, padding to 16: the broadcast path holds R x BLOCK_N x
    BLOCK_K fp32 products per program, so at 4 rows its weight tile per K step is a quarter of
    the 1-row tile (4 KB at 7B) and the SM keeps ~16 KB of weights in flight; the tl.dot path's
    accumulator is only R x BLOCK_N, its weight tiles stream through shared memory as 16-byte
    cp.async two steps ahead (48-57 KB in flight per SM at 7B, see the static report), and
    the padded MMA work is free in a memory-bound loop.
    """
    if rows <= 2:
        return max(rows, 1)
    return min(MAX_BLOCK_R, max(16, triton.next_power_of_2(rows)))


def gemv_config(device_type: str, rows: int, n: int, k: int, tiles: int = 1, min_block_n: int = 4,
                split_align: int | None = None, normed: bool = False) -> dict:
    """The launch configuration of a read-once GEMV of `rows` rows over an [n, k] weight.

    Returns BLOCK_R, BLOCK_N, BLOCK_K, STATS_K (columns per step of the RMS statistics), SPLIT_K
    (programs along K per weight tile; 1 = no split) and the launch options num_warps and
    num_stages. `tiles`: weight tiles per K step (2 for gate + up). `split_align`: None forbids
    split-K (the op has no split epilogue); otherwise every K range must start at a multiple
    of it (mtp_input: H, so a range never straddles its two normalised halves).

    Broadcast path (1 or 2 rows): BLOCK_N is the largest of 64..min_block_n that still gives
    TARGET_PROGRAMS programs (N = 3584 at 7B: 4 rows, 896 programs, 6.8 per SM where 8 rows
    would give 3.4: the busiest SM would stream 4 / 3.4 = 1.18x the mean); the [R, N, K]
    accumulator holds BROADCAST_TILE fp32 products (64 registers per thread at 4 warps),
    preferring K steps of >= 256 columns (512 contiguous bytes per weight row, 16-byte vector
    loads) over a wide BLOCK_N.

    tl.dot path: BLOCK_R = 16..128 rows, BLOCK_K = 128 (a [16, 128] bf16 weight tile is 16 bytes
    per thread at 4 warps: one 128-bit cp.async each); 8 warps from 64 rows on so that the
    [BLOCK_R, BLOCK_N] accumulators stay at <= 64 registers per thread. `normed` (the kernel
    builds its activation chunk in registers: RMSNorm prologues) bounds that fp32 chunk to 32
    values per thread, so at 128 rows BLOCK_K = 64 and BLOCK_N >= 32 (mtp_input: 227 -> 127
    registers, 1 -> 2 programs per SM). Three pipeline stages: the weight tiles of steps k+1
    and k+2 are in flight (cp.async) while step k multiplies.

    Split-K (tl.dot path; decode/MCTP steps of 3-16 rows): at the 7B shapes a narrow projection
    (N = 3584: o_proj, down_proj, mtp_input) has 3584 / 16 = 224 tiles of tl.dot's minimum 16
    columns: 1.7 programs per SM of 132, so 40 SMs stream one tile while 92 stream two (85% of
    the machine at best) and an SM holds 1-2 programs' loads in flight. Four K ranges give 896
    programs (6.8 per SM, 97% balanced, 4x the loads in flight) for 4 x 16 x 3584 x 4 B = 0.9 MB
    of fp32 partials written and read back from L2 by a second, tiny launch (the reduction +
    epilogue), against 25.7-136 MB of weights: ~3.5% more traffic and one more launch inside the
    captured step graph. Larger row blocks (prefill chunks) split too while the partials stay
    under 1/8 of the bf16 weight bytes (splits x R x 16 <= K): at R = 40 o_proj splits four ways
    (4 x 40 x 3584 x 4 B = 2.3 MB of partials against 25.7 MB of weights), at R = 128 it does
    not (K = 3584), while down_proj (K = 18944) still does.
    """
    block_r = gemv_row_block(rows)
    target = TARGET_PROGRAMS[device_type]
    if block_r < 16:
        block_n = 64
        while block_n > min_block_n and triton.cdiv(n, block_n) < target:
            block_n //= 2
        block_n = max(min_block_n, min(block_n, triton.next_power_of_2(n)))
        while block_n > min_block_n and BROADCAST_TILE // (block_r * block_n * tiles) < 256:
            block_n //= 2
        block_k = max(64, min(1024, BROADCAST_TILE // (block_r * block_n * tiles)))
        block_k = min(block_k, max(16, triton.next_power_of_2(k)))
        num_warps, num_stages = NUM_WARPS, 1
    else:
        num_warps = 4 if block_r <= 32 else 8
        threads = 32 * num_warps
        block_k = 128
        if normed:  # the normalised [BLOCK_R, BLOCK_K] fp32 chunk: <= 32 values per thread
            block_k = min(block_k, 32 * threads // block_r)
        block_k = min(block_k, max(16, triton.next_power_of_2(k)))
        # 16-byte weight loads need >= 8 bf16 weights per thread in a [BLOCK_N, BLOCK_K] tile.
        narrowest = max(16, 8 * threads // block_k)
        # Accumulators: block_r * block_n * tiles fp32 values <= 64 per thread.
        block_n = max(narrowest, min(64, 64 * threads // (block_r * tiles)))
        while block_n > narrowest and triton.cdiv(n, block_n) < target:
            block_n //= 2
        block_n = max(16, min(block_n, triton.next_power_of_2(n)))
        # Half-width tiles when they spread clearly more evenly over the SMs (gate_up at 3-32
        # rows: 592 tiles of 32 columns load the busiest SM with 5 where the mean is 4.48, 1184
        # of 16 with 9 where the mean is 8.97). Not from 64 rows on: there a program holds
        # 130-170 registers, one or two fit per SM, and halving its tile halves the bytes the
        # SM keeps in flight (gate_up at 40 rows: 32 -> 16 KB, per the static report).
        if (device_type == "cuda" and block_r <= 32 and block_n // 2 >= narrowest
                and sm_balance(triton.cdiv(n, block_n // 2)) > sm_balance(triton.cdiv(n, block_n)) + 0.02):
            block_n //= 2
        num_stages = 3
    split_k = 1
    if split_align is not None and block_r >= 16 and triton.cdiv(n, block_n) < target:
        for splits in (2, 4, 8):
            if block_r > 16 and splits * rows * 16 > k:
                break  # partials (splits x R x N x 4 B) would pass 1/8 of the bf16 weight bytes
            # A shorter K step where K does not divide evenly, down to 16 (tl.dot's minimum) and,
            # on a GPU, to no fewer than 8 weights per thread (16-byte loads).
            shortest = max(16, 8 * 32 * num_warps // block_n) if device_type == "cuda" else 16
            step = block_k
            while step >= shortest and (k % (splits * step) or split_align % (k // splits)):
                step //= 2
            if step < shortest:
                continue
            split_k, block_k = splits, step
            if triton.cdiv(n, block_n) * splits >= target:
                break
    # Row statistics read [BLOCK_R, STATS_K] per step: few wide steps on the broadcast path (3584
    # columns in one step at 1 row), bounded to 4096 fp32 values in registers; on the tl.dot
    # path the K step's own width, whose [>= 16, 128] chunk is already 2048+ values (wider
    # chunks spill in mtp_input, which keeps three sets of row statistics live).
    stats_k = block_k if block_r >= 16 else max(block_k, min(triton.next_power_of_2(k), 4096 // block_r))
    return dict(BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_K=block_k, STATS_K=stats_k, SPLIT_K=split_k,
                num_warps=num_warps, num_stages=num_stages)


@dataclass
class Launch:
    """One kernel launch as a launcher issues it: `kernel[grid](*args, **kwargs)`.

    kwargs hold the constexprs and the launch options (num_warps, num_stages). The AOT build
    compiles exactly this (through the JIT's own argument specialisation), and the geometry
    tests read grid and constexprs from it, so neither can drift from what runs.
    """
    kernel: object
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


def run_launches(launches: list[Launch]) -> None:
    for launch in launches:
        launch()


# Row counts the AOT build compiles at the 7B shapes: decode (1), the MCTP steps (2, 4 and
# Turbo/Boost's 11 and 14), the 16-row block edge, prefill chunks (32, 40, 128); bf16, and
# fp16 once.
AOT_ROWS = ((torch.bfloat16, (1, 2, 4, 11, 14, 16, 32, 40, 128)), (torch.float16, (1,)))


def meta_tensor(shape, dtype: torch.dtype) -> torch.Tensor:
    """A storage-less tensor (data_ptr 0: 16-byte aligned, as CUDA allocations are) to plan with."""
    return torch.empty(shape, dtype=dtype, device="meta")


def aot_row_launches(label: str, planner: Callable[[int, torch.dtype], list[Launch]]) -> list[tuple[str, Launch]]:
    """(label, launch) for every dtype and row count of AOT_ROWS; planner(rows, dtype) plans one
    step with meta tensors."""
    return [(f"{label} {triton_type(dtype)} R={rows}", launch)
            for dtype, row_counts in AOT_ROWS for rows in row_counts for launch in planner(rows, dtype)]


def row_grid(rows: int, block_r: int) -> int:
    """Row blocks of a launch: 1 for any step of <= MAX_BLOCK_R rows."""
    return triton.cdiv(rows, block_r)


def expect(name: str, t, shape, dtype: torch.dtype, device: torch.device, contiguous: bool = False) -> None:
    """Raise ValueError naming `name` unless `t` is a tensor of `shape` (ints are checked, str
    entries such as "R" name free dimensions), `dtype` and `device` (and contiguous if asked)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    shown = "[" + ", ".join(str(s) for s in shape) + "]"
    if t.dim() != len(shape) or any(isinstance(s, int) and t.shape[i] != s for i, s in enumerate(shape)):
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {shown}")
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of the other inputs)")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (read row-major), got strides {list(t.stride())}")


def expect_out(name: str, out, shape, dtype: torch.dtype, device: torch.device) -> None:
    """Validate a destination: exact shape, dtype, device, unit stride in the last dimension."""
    expect(name, out, shape, dtype, device)
    if out.dim() and out.shape[-1] > 1 and out.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension, got strides {list(out.stride())}")


def model_dtype(name: str, t) -> torch.dtype:
    """The model dtype, taken from activation `name`; also checks Triton can run on its device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} has dtype {t.dtype}, expected torch.float32, torch.bfloat16 or torch.float16")
    if not triton_runs_on(t.device):
        raise ValueError(f"{name} is on {t.device}: Triton kernels need a CUDA device, or the CPU with "
                         "TRITON_INTERPRET=1 set before vita_kernels is imported")
    return t.dtype


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """Activations are addressed by row stride: give them a unit last-dimension stride."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def aot_signature(kernel, types: dict[str, str], constexprs: dict) -> dict[str, str]:
    """The full `ASTSource` signature of `kernel`: constexprs, the given `types` (pointers such
    as "*bf16", "fp32" scalars), "i32" for every other (integer) argument."""
    names = kernel.arg_names
    unknown = set(types) - set(names) | set(constexprs) - set(names)
    if unknown:
        raise ValueError(f"{kernel.__name__} has no arguments {sorted(unknown)}")
    return {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in names}


def triton_type(dtype: torch.dtype) -> str:
    return _TRITON_TYPES[dtype]


# What the GEMV-family launchers compile at the 7B shapes: every row block in bf16, one in fp16.
AOT_ROW_BLOCKS = ((torch.bfloat16, (1, 2, 4, 16)), (torch.float16, (1,)))


def aot_row_variants(kernel, types: Callable[[str], dict[str, str]], config: Callable[[int], dict]) -> list[tuple]:
    """(kernel, signature, constexprs) per dtype and row block of AOT_ROW_BLOCKS.

    types(ptr) gives the argument types for element pointer type `ptr` ("*bf16", ...);
    config(rows) gives the constexprs the launcher picks for `rows` rows on a GPU.
    """
    variants = []
    for dtype, row_blocks in AOT_ROW_BLOCKS:
        arg_types = types("*" + triton_type(dtype))
        for rows in row_blocks:
            constexprs = config(rows)
            variants.append((kernel, aot_signature(kernel, arg_types, constexprs), constexprs))
    return variants

