"""The GEMV-family launch geometry, read from the launchers' own plans (no GPU needed), and the
behaviour the geometry choices must not change: prefill row blocks, split-K reproducibility,
NaN logits in the fused argmax.

Plans are built with meta tensors at the 7B shapes for the CUDA target, exactly as the
launchers build them before launching.
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, TOLERANCES

from vita_kernels import _tl, gate_up, head, linear, mtp_input
from vita_kernels.registry import GEOMETRIES, get_op

G = GEOMETRIES["7b"]
META = _tl.meta_tensor
BF16 = torch.bfloat16


def _plans(rows: int) -> dict[str, tuple[list[_tl.Launch], int, int]]:
    """op label -> (launches, weight rows N, weight columns K) at the 7B shapes for `rows` rows."""
    h, i, v, q = G.hidden, G.intermediate, G.vocab, G.num_heads * G.head_dim
    kv = G.num_kv_heads * G.head_dim
    plans = {}
    for label, k, n, bias, res in (("o_proj", q, h, False, True), ("down_proj", i, h, False, True),
                                   ("k_proj", h, kv, True, False)):
        plans[label] = (linear.plan(META((rows, k), BF16), META((n, k), BF16), META((n,), BF16) if bias else None,
                                    META((rows, n), BF16) if res else None, META((rows, n), BF16), target="cuda"), n, k)
    plans["gate_up"] = (gate_up.plan(META((rows, h), BF16), META((h,), BF16), META((2 * i, h), BF16), G.eps,
                                     META((rows, i), BF16), target="cuda"), i, h)  # a tile covers gate n and up I + n
    plans["mtp_input"] = (mtp_input.plan(META((rows,), torch.int64), META((v, h), BF16), META((rows, h), BF16),
                                         META((h,), BF16), META((h,), BF16), META((h,), BF16), META((h, 2 * h), BF16),
                                         G.eps, META((rows, h), BF16), target="cuda"), h, 2 * h)
    for write_logits in (False, True):
        out = META((rows, v), torch.float32) if write_logits else META((rows,), torch.int64)
        plans["head_logits" if write_logits else "head_argmax"] = (
            head.plan(META((rows, h), BF16), META((h,), BF16), META((v, h), BF16), G.eps, out, write_logits,
                      target="cuda"), v, h)
    return plans


def _tiles(launch: _tl.Launch, n: int, k: int, rows: int) -> list[tuple[range, range, range]]:
    """(weight rows, weight columns, activation rows) each program of a GEMV launch covers."""
    cfg = launch.kwargs
    grid = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
    k_split = k // cfg["SPLIT_K"]
    return [(range(pn * cfg["BLOCK_N"], min(n, (pn + 1) * cfg["BLOCK_N"])),
             range(pk * k_split, (pk + 1) * k_split),
             range(pr * cfg["BLOCK_R"], min(rows, (pr + 1) * cfg["BLOCK_R"])))
            for pn in range(grid[0]) for pr in range(grid[1]) for pk in range(grid[2])]


@pytest.mark.parametrize("rows", [1, 2, 4, 11, 16, 40, 128])
def test_each_weight_element_is_read_by_exactly_one_program(rows):
    """One row block covers every row (grid row axis 1) for <= 128 rows, and the programs'
    (weight rows x K range) tiles partition the [N, K] weight: each element read exactly once."""
    for label, (launches, n, k) in _plans(rows).items():
        gemv = launches[0]
        assert gemv.grid[1] == 1, f"{label} R={rows}: {gemv.grid[1]} row blocks, each re-reads the weight"
        assert gemv.kwargs["BLOCK_R"] >= rows, label
        tiles = _tiles(gemv, n, k, rows)
        assert len(tiles) == gemv.grid[0] * gemv.grid[1] * (gemv.grid[2] if len(gemv.grid) > 2 else 1)
        # Weight rows: consecutive disjoint ranges covering [0, n); K ranges: the same for [0, k).
        n_ranges = sorted({(t[0].start, t[0].stop) for t in tiles})
        k_ranges = sorted({(t[1].start, t[1].stop) for t in tiles})
        for ranges, size in ((n_ranges, n), (k_ranges, k)):
            assert ranges[0][0] == 0 and ranges[-1][1] == size, (label, ranges[:2], ranges[-2:])
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), label
        pairs = [(t[0].start, t[1].start) for t in tiles]
        assert len(pairs) == len(set(pairs)) == len(n_ranges) * len(k_ranges), f"{label}: a weight tile read twice"
        if k_ranges != [(0, k)]:  # split-K: the K range is a whole number of K steps
            assert all((b - a) % gemv.kwargs["BLOCK_K"] == 0 for a, b in k_ranges), label


def test_rows_beyond_128_take_a_row_axis():
    launches, _, _ = _plans(300)["o_proj"]
    assert launches[0].grid[1] == 3 and launches[0].kwargs["BLOCK_R"] == 128


@pytest.mark.parametrize("rows, block_r", [(1, 1), (2, 2), (3, 16), (4, 16), (5, 16), (16, 16), (17, 32), (33, 64),
                                           (65, 128), (128, 128), (129, 128)])
def test_row_blocks(rows, block_r):
    assert _tl.gemv_config("cuda", rows, 3584, 3584)["BLOCK_R"] == block_r


def test_split_k_only_where_it_pays():
    """Split-K where a narrow projection has under 4 programs per SM: o_proj, down_proj and
    mtp_input (N = 3584) at 3..16 rows, four ways; never gate_up / head (wide N), never on the
    broadcast path; beyond 16 rows only while the fp32 partials stay under 1/8 of the bf16
    weight bytes (o_proj at 128 rows does not split)."""
    for rows in (4, 11, 14, 16):
        plans = _plans(rows)
        for label in ("o_proj", "down_proj", "mtp_input"):
            launches = plans[label][0]
            assert launches[0].kwargs["SPLIT_K"] == 4 and launches[0].grid[0] * 4 >= 4 * 132, label
            assert len(launches) == 1, label  # the tiles' last programs sum the partials: one launch
    for rows in (1, 2, 4, 11, 16, 32, 40, 128):
        for label, (launches, n, k) in _plans(rows).items():
            split = launches[0].kwargs["SPLIT_K"]
            if label in ("gate_up", "head_argmax", "head_logits") or rows <= 2:
                assert split == 1 and len(launches) == 1, (label, rows)
            if rows > 16 and split > 1:
                assert split * rows * 16 <= k, (label, rows, split)
    assert _plans(128)["o_proj"][0][0].kwargs["SPLIT_K"] == 1


def test_register_budget_of_the_configurations():
    """The accumulators a program holds fit in <= 64 fp32 registers per thread for every row block."""
    for rows in (1, 2, 4, 11, 16, 32, 40, 128):
        for label, (launches, _, _) in _plans(rows).items():
            cfg = launches[0].kwargs
            tiles = 2 if label == "gate_up" else 1
            threads = 32 * cfg["num_warps"]
            if cfg["BLOCK_R"] < 16:
                held = cfg["BLOCK_R"] * cfg["BLOCK_N"] * cfg["BLOCK_K"] * tiles
            else:
                held = cfg["BLOCK_R"] * cfg["BLOCK_N"] * tiles
            assert held <= 64 * threads, (label, rows, cfg)


# ----------------------------------------------------------------------------- behaviour (interpreter)


def _small(op: str, rows: int, dtype=torch.float32, seed: int = 5) -> dict:
    """A tiny-geometry argument set for `op` with `rows` rows (the registry's inputs, resized)."""
    geom = GEOMETRIES["tiny"]
    gen = torch.Generator().manual_seed(seed)
    kw = dict(get_op(op).cases(geom, dtype, DEVICE, gen)[0].kwargs)
    for name in ("x", "hidden", "residual"):
        if kw.get(name) is not None:
            t = kw[name]
            kw[name] = torch.randn((rows, t.shape[1]), generator=gen).to(dtype).to(DEVICE)
    if "ids" in kw:
        kw["ids"] = torch.randint(0, geom.vocab, (rows,), generator=gen).to(DEVICE)
    return kw


@pytest.mark.parametrize("rows", [2, 40])
@pytest.mark.parametrize("op", ["linear", "norm_gate_up", "mtp_input", "head_logits"])
def test_row_block_classes_match_reference(op, rows):
    """2 rows (the 2-row broadcast block) and 40 rows (one 64-row tl.dot block, the prefill
    path), which the registry's row counts (1, 3, 11) do not reach, equal the reference."""
    kw = _small(op, rows)
    spec = get_op(op)
    got = spec.impls["triton"](**kw)
    want = spec.ref(**kw)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("op", ["linear", "mtp_input"])
def test_split_k_is_reproducible_and_exact(op):
    """11 rows at the tiny shapes split K (the plan says so); two runs agree bit for bit and with
    the reference in bf16."""
    kw = _small(op, 11, torch.bfloat16)
    if op == "linear":
        assert linear.config("cpu", 11, *kw["weight"].shape)["SPLIT_K"] > 1
    else:
        assert mtp_input.config("cpu", 11, kw["hidden"].shape[1])["SPLIT_K"] > 1
    fn = get_op(op).impls["triton"]
    first, second = fn(**kw), fn(**kw)
    assert torch.equal(first, second)
    torch.testing.assert_close(first.float(), get_op(op).ref(**kw).float(), **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_argmax_nan_logits_win_lowest_id(impl):
    """NaN logits win, the lowest NaN id, as torch.argmax decides (ids 50 and 7 of the vocabulary
    are NaN rows of the head for every row; row 2's logits also hold +inf elsewhere)."""
    kw = _small("head_argmax", 3)
    w = kw["w_head"].clone()
    w[50] = float("nan")
    w[7, 3] = float("nan")
    w[100] = 1e30  # large logits elsewhere (+inf in fp32 for some rows) must still lose
    kw["w_head"] = w
    fn = head.head_argmax_ref if impl == "ref" else head.head_argmax
    got = fn(**kw)
    assert got.tolist() == [7, 7, 7]
    logits = head.head_logits_ref(**kw)
    assert got.tolist() == logits.argmax(dim=-1).tolist()


def test_argmax_without_nan_unchanged_by_nan_logic():
    kw = _small("head_argmax", 3)
    assert head.head_argmax(**kw).tolist() == head.head_argmax_ref(**kw).tolist()
