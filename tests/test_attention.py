"""Attention-specific behaviour beyond the registry cases: the first slot, row blocks and KV blocks
past one, both GQA launch layouts, several sequences in separate cache regions, long caches, strided
layouts, garbage past the visible slots, CUDA-graph capture, and argument validation."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE

from vita_kernels import attention as attn_mod
from vita_kernels.attention import attention, attention_ref


def _inputs(gen, rows, num_heads, num_kv_heads, head_dim, max_len, dtype=torch.float32):
    def rnd(*shape):
        return torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)

    return rnd(rows, num_heads, head_dim), rnd(num_kv_heads, max_len, head_dim), rnd(num_kv_heads, max_len, head_dim)


def _pos(p: int, rows: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cache_rows, positions) of `rows` rows at positions p.. of the cache region at `start`."""
    positions = torch.arange(p, p + rows, dtype=torch.int64, device=DEVICE)
    return positions + start, positions


def _assert_matches_ref(o, q, k, v, pos, atol=2e-5):
    ref = attention_ref(q.float(), k.float(), v.float(), *pos)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.float(), ref, atol=atol, rtol=atol)


def test_pos0_single_row_is_the_first_value_row(gen):
    """Row 0 at pos 0 sees only slot 0: the output is exactly V[g(h), 0]."""
    q, k, v = _inputs(gen, 1, 6, 2, 16, 48)
    o = attention(q, k, v, *_pos(0, 1))
    expected = v[:, 0].repeat_interleave(3, dim=0).reshape(1, -1)
    torch.testing.assert_close(o, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("heads_per_program", [1, 3], ids=["per-head", "grouped"])
@pytest.mark.parametrize("rows, pos", [(1, 0), (17, 0), (40, 7), (33, 60)], ids=lambda x: str(x))
def test_row_blocks_and_gqa_layouts(gen, rows, pos, heads_per_program):
    """R past one row block (16 rows per-head, 16 x 4 grouped) and KV past one block, both layouts."""
    q, k, v = _inputs(gen, rows, 6, 2, 16, 100)
    _assert_matches_ref(attention(q, k, v, *_pos(pos, rows), heads_per_program=heads_per_program), q, k, v,
                        _pos(pos, rows))


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(4, 4, 16), (7, 1, 128), (6, 3, 24), (8, 2, 64)],
                         ids=["mha", "mqa-group7-d128", "d24-unpadded", "group4-d64"])
@pytest.mark.parametrize("rows", [2, 20], ids=["R2", "R20"])
def test_head_geometries(gen, num_heads, num_kv_heads, head_dim, rows):
    """Group sizes 1, 7 (padded to 8 in the grouped tile, as at 7B), 2, 4; head_dim not a power of 2."""
    q, k, v = _inputs(gen, rows, num_heads, num_kv_heads, head_dim, 64)
    _assert_matches_ref(attention(q, k, v, *_pos(64 - rows, rows)), q, k, v, _pos(64 - rows, rows))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_long_cache_low_precision(gen, dtype):
    """A 300-slot cache ending at the last slot: error at most 2x the low-precision reference's."""
    rows, max_len = 5, 300
    q, k, v = _inputs(gen, rows, 6, 2, 32, max_len, dtype)
    pos = _pos(max_len - rows, rows)
    truth = attention_ref(q.float(), k.float(), v.float(), *pos)
    base_err = (attention_ref(q, k, v, *pos).float() - truth).abs().max().item()
    err = (attention(q, k, v, *pos).float() - truth).abs().max().item()
    assert err <= 2 * base_err + 1e-5, (err, base_err)


def test_slots_past_the_last_row_are_never_read(gen):
    """NaN in cache slots >= pos + R (not yet written) must not reach the output."""
    rows, pos = 11, 20
    q, k, v = _inputs(gen, rows, 6, 2, 16, 64)
    k_dirty, v_dirty = k.clone(), v.clone()
    k_dirty[:, pos + rows:] = float("nan")
    v_dirty[:, pos + rows:] = float("inf")
    _assert_matches_ref(attention(q, k_dirty, v_dirty, *_pos(pos, rows)), q, k, v, _pos(pos, rows))


@pytest.mark.parametrize("heads_per_program", [1, 3], ids=["per-head", "grouped"])
def test_sequences_in_separate_regions(gen, heads_per_program):
    """Several sequences in one step, each in its own cache region (in any order), with row
    counts past one row block and padding entries: each sequence's rows equal that sequence
    run alone, and no row sees another region (the other regions hold NaN)."""
    region = 64
    layout = [(2, 20, 5), (0, 0, 1), (3, 40, 18)]  # (region, first position, rows)
    rows = sum(n for _, _, n in layout)
    q, k, v = _inputs(gen, rows, 6, 2, 16, 4 * region)
    k_dirty, v_dirty = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    cache_rows, positions, seqs, first = [], [], [], 0
    for r, p, n in layout:
        span = slice(r * region, r * region + p + n)
        k_dirty[:, span], v_dirty[:, span] = k[:, span], v[:, span]
        cr, ps = _pos(p, n, start=r * region)
        cache_rows.append(cr)
        positions.append(ps)
        seqs.append([first, n])
        first += n
    seqs += [[rows, 0], [rows, 0]]  # padding entries
    as_tensor = dict(dtype=torch.int64, device=DEVICE)
    o = attention(q, k_dirty, v_dirty, torch.cat(cache_rows), torch.cat(positions), seqs=torch.tensor(seqs, **as_tensor),
                  max_seq_rows=32, heads_per_program=heads_per_program)
    first = 0
    for r, p, n in layout:
        region_k, region_v = k[:, r * region:(r + 1) * region], v[:, r * region:(r + 1) * region]
        _assert_matches_ref(o[first:first + n], q[first:first + n], region_k, region_v, _pos(p, n))
        first += n


def test_strided_layouts(gen):
    """q with a non-unit last stride, caches as [S, nkv, d] views (flash-attn's layout), and a
    row-padded out=."""
    rows, pos = 12, 30
    q, k, v = _inputs(gen, rows, 6, 2, 16, 64)
    q_strided = torch.empty(rows, 6, 32, device=DEVICE)[..., ::2]
    q_strided.copy_(q)
    k_seq_major = k.transpose(0, 1).contiguous().transpose(0, 1)  # [nkv, S, d] view of [S, nkv, d]
    v_seq_major = v.transpose(0, 1).contiguous().transpose(0, 1)
    out = torch.full((rows, 6 * 16 + 8), float("nan"), device=DEVICE)[:, : 6 * 16]
    res = attention(q_strided, k_seq_major, v_seq_major, *_pos(pos, rows), out=out)
    assert res is out
    _assert_matches_ref(out, q, k, v, _pos(pos, rows))


def test_launch_policy():
    """Decode and the MCTP steps (R <= 16) get one program per query head (28 at 7B); prefill
    gets one per KV head and 8-row block, each K/V block serving all 7 heads of its group."""
    grid, cfg, _ = attn_mod._launch_config(1, 1, 28, 4, 128, torch.bfloat16)
    assert grid == (28, 1, 1) and cfg["HEADS"] == 1
    grid, cfg, _ = attn_mod._launch_config(14, 8, 28, 4, 128, torch.bfloat16)
    assert grid == (28, 8, 1)
    grid, cfg, _ = attn_mod._launch_config(300, 1, 28, 4, 128, torch.bfloat16)
    assert cfg["HEADS"] == 7 and cfg["HEADS_P"] == 8 and grid == (4, 1, math.ceil(300 / cfg["BLOCK_R"]))


@pytest.mark.parametrize("make, match", [
    (lambda q, k, v, c, p: (q[0], k, v, c, p), "q must be"),
    (lambda q, k, v, c, p: (q, k[0], v, c, p), "k_cache must be"),
    (lambda q, k, v, c, p: (q, k, v[:, :10], c, p), "v_cache has shape"),
    (lambda q, k, v, c, p: (q, k.half(), v, c, p), "k_cache has dtype"),
    (lambda q, k, v, c, p: (q.int(), k, v, c, p), "q has dtype"),
    (lambda q, k, v, c, p: (q[:, :5], k, v, c, p), "expected a multiple of k_cache's 2 KV heads"),
    (lambda q, k, v, c, p: (q[..., :8], k, v, c, p), "k_cache has head_dim 16"),
    (lambda q, k, v, c, p: (q, k, v, c.int(), p), "cache_rows has dtype"),
    (lambda q, k, v, c, p: (q, k, v, c, p[:2]), r"positions has shape \[2\], expected \[3\]"),
    (lambda q, k, v, c, p: (q, k, v, c, p, torch.empty(3, 95, device=q.device)), "out has shape"),
    (lambda q, k, v, c, p: (q, k, v, c, p, torch.empty(3, 96, device=q.device, dtype=torch.half)), "out has dtype"),
], ids=["q-2d", "cache-2d", "v-shape", "k-dtype", "q-int", "heads-not-multiple", "head-dim", "rows-int32",
        "positions-short", "out-shape", "out-dtype"])
def test_bad_arguments(gen, make, match):
    q, k, v = _inputs(gen, 3, 6, 2, 16, 48)
    with pytest.raises(ValueError, match=match):
        attention(*make(q, k, v, *_pos(4, 3)))


def test_bad_sequence_table(gen):
    q, k, v = _inputs(gen, 3, 6, 2, 16, 48)
    with pytest.raises(ValueError, match=r"seqs has shape \[2\], expected \[B, 2\]"):
        attention(q, k, v, *_pos(4, 3), seqs=torch.zeros(2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="max_seq_rows must be a positive int"):
        attention(q, k, v, *_pos(4, 3), max_seq_rows=0)


def test_bad_heads_per_program(gen):
    q, k, v = _inputs(gen, 3, 6, 2, 16, 48)
    with pytest.raises(ValueError, match="heads_per_program must be 1 or the group size 3"):
        attention(q, k, v, *_pos(4, 3), heads_per_program=2)


@pytest.mark.gpu
def test_cuda_graph_capture_reads_positions_on_the_device(gen):
    """Captured once, replayed at new positions by writing the position tensors: no host sync, fixed grid."""
    rows = 14
    q, k, v = _inputs(gen, rows, 28, 4, 128, 512, torch.bfloat16)
    cache_rows, positions = _pos(0, rows)
    out = torch.empty(rows, 28 * 128, device=DEVICE, dtype=torch.bfloat16)
    attention(q, k, v, cache_rows, positions, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention(q, k, v, cache_rows, positions, out=out)
    for p in (0, 100, 512 - rows):
        for t, value in zip((cache_rows, positions), _pos(p, rows)):
            t.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        truth = attention_ref(q.float(), k.float(), v.float(), cache_rows, positions)
        base_err = (attention_ref(q, k, v, cache_rows, positions).float() - truth).abs().max().item()
        assert (out.float() - truth).abs().max().item() <= 2 * base_err + 1e-5


@pytest.mark.parametrize("splits", [2, 3, 5], ids=lambda s: f"{s}splits")
@pytest.mark.parametrize("rows, pos", [(1, 0), (1, 70), (11, 40), (20, 3)], ids=lambda x: str(x))
def test_split_kv_walks_equal_one_walk(gen, splits, rows, pos):
    """Splits holding no visible slot (a row at position 0, splits past the end) included, and
    a split result is reproducible bit for bit."""
    q, k, v = _inputs(gen, rows, 6, 2, 16, 100)
    pos_t = _pos(pos, rows)
    o = attention(q, k, v, *pos_t, window=pos + rows, kv_splits=splits)
    _assert_matches_ref(o, q, k, v, pos_t)
    assert torch.equal(o, attention(q, k, v, *pos_t, window=pos + rows, kv_splits=splits))


def test_split_policy_at_7b():
    """Decode and MCTP steps at 7B with a 512-slot bound split into >= 132 programs; a batch
    that already fills the GPU, or a short bound, does not split."""
    for rows in (1, 11, 14):
        grid, cfg, opts = attn_mod._launch_config(rows, 1, 28, 4, 128, torch.bfloat16, window=512)
        assert cfg["SPLITS"] == 5 and grid[0] * grid[1] * grid[2] >= 132
        assert opts["split_len"] * cfg["SPLITS"] >= 512 and opts["split_len"] % cfg["BLOCK_N"] == 0
    assert attn_mod._launch_config(1, 8, 28, 4, 128, torch.bfloat16, window=512)[1]["SPLITS"] == 1
    assert attn_mod._launch_config(1, 1, 28, 4, 128, torch.bfloat16, window=256)[1]["SPLITS"] == 1


def test_window_reference_equals_whole_cache_reference(gen):
    q, k, v = _inputs(gen, 5, 6, 2, 16, 64)
    pos = _pos(30, 5, start=10)
    torch.testing.assert_close(attention_ref(q, k, v, *pos, window=35), attention_ref(q, k, v, *pos), atol=1e-6,
                               rtol=1e-6)
