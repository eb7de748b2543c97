"""The gathers and scatters folded into the fused ops (what the runtime's steps use instead of
separate index ops): each against its reference with the same indices, on fresh random inputs,
rows outside the indices untouched."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from vita_kernels import head, linear, mtp_input
from vita_kernels.registry import GEOMETRIES, norm_weight, randn, weight

G = GEOMETRIES["tiny"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _rows(gen, count, history):
    return torch.randperm(history, generator=gen)[:count].to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("rows", [1, 3, 11])
def test_linear_scatters_rows_into_a_history(gen, dtype, rows):
    k, n, history = G.intermediate, G.hidden, 40
    x, w = randn((rows, k), dtype, DEVICE, gen), weight((n, k), dtype, DEVICE, gen)
    residual = randn((rows, n), dtype, DEVICE, gen)
    out_rows = _rows(gen, rows, history)
    base = randn((history, n), dtype, DEVICE, gen)
    ours, ref = base.clone(), base.clone()
    linear.linear(x, w, None, residual, out=ours, out_rows=out_rows)
    linear.linear_ref(x, w, None, residual, out=ref, out_rows=out_rows)
    untouched = torch.ones(history, dtype=torch.bool, device=DEVICE)
    untouched[out_rows] = False
    assert torch.equal(ours[untouched], base[untouched])
    torch.testing.assert_close(ours.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("rows", [1, 3, 11])
def test_mtp_input_gathers_ids_and_hidden_rows(gen, dtype, rows):
    h, history = G.hidden, 30
    tokens = torch.randint(0, G.vocab, (history,), generator=gen).to(DEVICE)
    hidden = randn((history, h), dtype, DEVICE, gen, scale=3.0)
    id_rows, hidden_rows = _rows(gen, rows, history), _rows(gen, rows, history)
    args = (tokens, randn((G.vocab, h), dtype, DEVICE, gen), hidden, norm_weight(h, dtype, DEVICE, gen),
            norm_weight(h, dtype, DEVICE, gen), norm_weight(h, dtype, DEVICE, gen), weight((h, 2 * h), dtype, DEVICE, gen),
            G.eps)
    ours = mtp_input.mtp_input(*args, id_rows=id_rows, hidden_rows=hidden_rows)
    ref = mtp_input.mtp_input_ref(*args, id_rows=id_rows, hidden_rows=hidden_rows)
    gathered = mtp_input.mtp_input(tokens[id_rows], *args[1:2], hidden[hidden_rows], *args[3:])
    torch.testing.assert_close(ours.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(ours, gathered)  # the same kernel, the rows only found differently


# fp32 only: ids must match exactly, and in bf16 a near-tie may legitimately resolve either way.
@pytest.mark.parametrize("rows", [1, 3])
def test_head_reads_rows_and_writes_tokens_and_seen(gen, rows, dtype=torch.float32):
    h, v, history, regions = G.hidden, G.vocab, 25, 4
    x = randn((history, h), dtype, DEVICE, gen, scale=2.0)
    nw, w = norm_weight(h, dtype, DEVICE, gen), weight((v, h), dtype, DEVICE, gen)
    x_rows, token_index = _rows(gen, rows, history), _rows(gen, rows, 60)
    seen_rows = torch.randperm(regions, generator=gen)[:rows].to(DEVICE)
    results = []
    for fn in (head.head_argmax, head.head_argmax_ref):
        tokens = torch.full((60,), -1, dtype=torch.int64, device=DEVICE)
        seen = torch.zeros((regions, v), dtype=torch.bool, device=DEVICE)
        ids = fn(x, nw, w, G.eps, x_rows=x_rows, tokens=tokens, token_index=token_index, seen=seen,
                 seen_rows=seen_rows)
        results.append((ids, tokens, seen))
    (ids, tokens, seen), (ref_ids, ref_tokens, ref_seen) = results
    assert torch.equal(ids, ref_ids) and torch.equal(tokens, ref_tokens) and torch.equal(seen, ref_seen)
    assert int(seen.sum()) == rows and torch.equal(tokens[token_index], ids)
    logits = head.head_logits(x, nw, w, G.eps, x_rows=x_rows)
    torch.testing.assert_close(logits, head.head_logits_ref(x, nw, w, G.eps, x_rows=x_rows), atol=TOL[dtype],
                               rtol=TOL[dtype])


def test_emit_arguments_come_in_pairs(gen):
    x = randn((2, G.hidden), torch.float32, DEVICE, gen)
    w = weight((G.vocab, G.hidden), torch.float32, DEVICE, gen)
    with pytest.raises(ValueError, match="tokens and token_index"):
        head.head_argmax(x, norm_weight(G.hidden, torch.float32, DEVICE, gen), w, G.eps,
                         tokens=torch.zeros(4, dtype=torch.int64, device=DEVICE))
