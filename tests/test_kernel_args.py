"""The Triton launchers' argument contract: bad inputs raise a ValueError that names the input,
`out=` destinations are validated and fully written, caches change only at the new slots,
strided activations work, and the fused argmax breaks ties like torch (lowest id).

Inputs come from the registry's cases at the tiny geometry; the validation tests never launch
a kernel. The accuracy of every op over all cases is tests/test_kernels.py's job.
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from vita_kernels import head, linear, norm, qkv_rope
from vita_kernels.registry import GEOMETRIES, get_op

GEOM = GEOMETRIES["tiny"]
LAUNCHED = ["mtp_input", "qkv_rope_cache", "linear", "norm_gate_up", "head_argmax", "head_logits", "add_rmsnorm"]
# Per op: the activation whose dtype sets the model dtype, and the read-only parameters that
# must be contiguous.
SOURCE = {"mtp_input": "hidden", "qkv_rope_cache": "x", "linear": "x", "norm_gate_up": "x", "head_argmax": "x",
          "head_logits": "x", "add_rmsnorm": "x"}
WEIGHTS = {
    "mtp_input": ["embed", "final_norm_weight", "emb_norm_weight", "hid_norm_weight", "w_proj"],
    "qkv_rope_cache": ["norm_weight", "w_qkv", "b_qkv", "cos_table", "sin_table"],
    "linear": ["weight", "bias"],
    "norm_gate_up": ["norm_weight", "w_gate_up"],
    "head_argmax": ["norm_weight", "w_head"],
    "head_logits": ["norm_weight", "w_head"],
    "add_rmsnorm": ["weight"],
}


def case_kwargs(op: str, dtype=torch.float32, index: int = 0, label: str | None = None) -> dict:
    """A valid argument set for `op` (the registry case `label`, or the index-th one)."""
    cases = get_op(op).cases(GEOM, dtype, DEVICE, torch.Generator().manual_seed(7))
    if label is not None:
        cases = [c for c in cases if c.name.startswith(label)]
    return dict(cases[index].kwargs)


def full_kwargs(op: str) -> dict:
    """A valid argument set using every optional tensor (linear: bias and residual)."""
    kw = case_kwargs(op)
    if op == "linear":
        kw["bias"] = torch.randn(kw["weight"].shape[0], generator=torch.Generator().manual_seed(3)).to(DEVICE)
    return kw


def tensor_args(op: str) -> list[str]:
    return [k for k, v in full_kwargs(op).items() if isinstance(v, torch.Tensor)]


def launch(op: str, **kwargs):
    return get_op(op).impls["triton"](**kwargs)


def other_float(dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if dtype != torch.float16 else torch.float32


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Same shape, dtype and values, every other element of a buffer twice as wide."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    return view


ARG_CASES = [(op, arg) for op in LAUNCHED for arg in tensor_args(op)]


def arg_id(pair) -> str:
    return f"{pair[0]}-{pair[1]}"


@pytest.mark.parametrize("op,arg", ARG_CASES, ids=[arg_id(p) for p in ARG_CASES])
def test_wrong_rank_names_argument(op, arg):
    kw = full_kwargs(op)
    kw[arg] = kw[arg].unsqueeze(0)
    with pytest.raises(ValueError, match=rf"^{arg} has shape \["):
        launch(op, **kw)


@pytest.mark.parametrize("op,arg", ARG_CASES, ids=[arg_id(p) for p in ARG_CASES])
def test_wrong_dtype_names_argument(op, arg):
    kw = full_kwargs(op)
    t = kw[arg]
    # The model dtype comes from the source activation: give it a non-float dtype instead.
    kw[arg] = t.to(torch.int32) if (not t.is_floating_point() or arg == SOURCE[op]) else t.to(other_float(t.dtype))
    with pytest.raises(ValueError, match=rf"^{arg} has dtype"):
        launch(op, **kw)


@pytest.mark.parametrize("op,arg", ARG_CASES, ids=[arg_id(p) for p in ARG_CASES])
def test_device_mismatch_names_argument(op, arg):
    kw = full_kwargs(op)
    kw[arg] = kw[arg].to("meta")
    with pytest.raises(ValueError, match=rf"^{arg} is on meta"):
        launch(op, **kw)


WEIGHT_CASES = [(op, w) for op in LAUNCHED for w in WEIGHTS[op]]


@pytest.mark.parametrize("op,arg", WEIGHT_CASES, ids=[arg_id(p) for p in WEIGHT_CASES])
def test_non_contiguous_weight_names_argument(op, arg):
    kw = full_kwargs(op)
    kw[arg] = non_contiguous(kw[arg])
    with pytest.raises(ValueError, match=rf"^{arg} must be contiguous"):
        launch(op, **kw)


@pytest.mark.parametrize("op", LAUNCHED)
def test_bad_out_names_out(op):
    kw = case_kwargs(op)
    expected = get_op(op).ref(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    expected = expected[0] if isinstance(expected, tuple) else expected
    bad_shape = torch.empty(*expected.shape[:-1], expected.shape[-1] + 1, dtype=expected.dtype, device=DEVICE)
    with pytest.raises(ValueError, match=r"^out has shape"):
        launch(op, **kw, out=bad_shape)
    bad_dtype = torch.empty(expected.shape, dtype=torch.int32 if expected.is_floating_point() else torch.float32,
                            device=DEVICE)
    with pytest.raises(ValueError, match=r"^out has dtype"):
        launch(op, **kw, out=bad_dtype)
    if expected.dim() >= 2:
        with pytest.raises(ValueError, match=r"^out must have unit stride"):
            launch(op, **kw, out=non_contiguous(torch.empty_like(expected)))


def test_size_mismatch_message_shows_expected_shape():
    kw = case_kwargs("qkv_rope_cache")
    n, h = kw["w_qkv"].shape
    kw["w_qkv"] = kw["w_qkv"][: n - 16].contiguous()
    with pytest.raises(ValueError, match=rf"^w_qkv has shape \[{n - 16}, {h}\], expected \[{n}, H\]"):
        qkv_rope.qkv_rope_cache(**kw)
    kw = case_kwargs("linear")
    kw["x"] = kw["x"][:, :-1]
    with pytest.raises(ValueError, match=r"^x has shape \[1, 95\], expected \[R, 96\]"):
        linear.linear(**kw)


def test_residual_out_validated():
    kw = case_kwargs("add_rmsnorm")
    with pytest.raises(ValueError, match=r"^residual_out has dtype"):
        norm.add_rmsnorm(**kw, residual_out=torch.empty_like(kw["x"], dtype=torch.float16))


def test_scalar_arguments_validated():
    kw = case_kwargs("qkv_rope_cache")
    with pytest.raises(ValueError, match=r"^num_heads \(5\) must be a multiple of num_kv_heads"):
        qkv_rope.qkv_rope_cache(**{**kw, "num_heads": 5})
    with pytest.raises(ValueError, match=r"^rope_offset must be"):
        qkv_rope.qkv_rope_cache(**{**kw, "rope_offset": -1})


# --------------------------------------------------------------------------- launched kernels


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, -7 if not t.is_floating_point() else float("nan"))


@pytest.mark.parametrize("op", LAUNCHED)
def test_out_given_is_fully_written_and_returned(op):
    """With out=, the result lands in (and is) `out`, poison is gone, and it equals out=None."""
    kw = case_kwargs(op, torch.bfloat16, index=1)
    fresh = launch(op, **{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    fresh = fresh[0] if isinstance(fresh, tuple) else fresh
    out = poisoned_like(fresh)
    got = launch(op, **kw, out=out)
    got = got[0] if isinstance(got, tuple) else got
    assert got is out
    assert torch.equal(out, fresh)


def test_add_rmsnorm_outputs():
    kw = case_kwargs("add_rmsnorm", torch.bfloat16, label="R3-H96-add")
    y_ref, s_ref = norm.add_rmsnorm_ref(**kw)
    y, s = poisoned_like(y_ref), poisoned_like(s_ref)
    got = norm.add_rmsnorm(**kw, out=y, residual_out=s)
    assert got[0] is y and got[1] is s
    assert torch.equal(s, s_ref) and torch.equal(y, y_ref)
    # Without a residual, s is x itself, as in the reference; residual_out= receives a copy.
    kw = case_kwargs("add_rmsnorm", torch.bfloat16, label="R3-H96-noadd")
    assert norm.add_rmsnorm(**kw)[1] is kw["x"]
    s = poisoned_like(kw["x"])
    assert torch.equal(norm.add_rmsnorm(**kw, residual_out=s)[1], kw["x"])


def test_cache_written_only_at_new_slots():
    kw = case_kwargs("qkv_rope_cache", torch.bfloat16, label="R3")
    k_before, v_before = kw["k_cache"].clone(), kw["v_cache"].clone()
    ref_kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    q_ref = qkv_rope.qkv_rope_cache_ref(**ref_kw)
    q = qkv_rope.qkv_rope_cache(**kw)
    new = torch.zeros(GEOM.cache_len, dtype=torch.bool)
    new[kw["cache_rows"]] = True
    for name, before in (("k_cache", k_before), ("v_cache", v_before)):
        assert torch.equal(kw[name][:, ~new], before[:, ~new]), f"{name} changed outside the rows' cache slots"
        assert torch.equal(kw[name][:, new], ref_kw[name][:, new]), f"{name} new slots differ from the reference"
        assert not torch.equal(kw[name][:, new], before[:, new])
    assert torch.equal(q, q_ref)


def test_strided_activations():
    """Row-strided and column-strided activations give the contiguous result."""
    kw = case_kwargs("linear", torch.bfloat16, label="o_proj-R3")
    expected = linear.linear(**kw)
    wide = torch.randn(kw["x"].shape[0], 2 * kw["x"].shape[1]).to(torch.bfloat16)
    wide[:, : kw["x"].shape[1]] = kw["x"]
    assert torch.equal(linear.linear(**{**kw, "x": wide[:, : kw["x"].shape[1]]}), expected)  # row stride 2K
    assert torch.equal(linear.linear(**{**kw, "x": non_contiguous(kw["x"])}), expected)  # column stride 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_argmax_ties_pick_lowest_id(dtype):
    """Equal maxima within a block and across blocks (and across reduce steps): lowest id wins."""
    kw = case_kwargs("head_argmax", dtype, label="R3")
    w = kw["w_head"]
    x_normed = norm.rmsnorm_ref(kw["x"], kw["norm_weight"], GEOM.eps).float()
    winner = (x_normed[0] / x_normed[0].norm() * 4).to(dtype)  # the largest logit of row 0 by far
    for vid in (300, 41, 40, 100):  # one block, then ids many blocks (and reduce steps) apart
        w[vid] = winner
    ids = head.head_argmax(**kw)
    logits = head.head_logits_ref(**kw)
    assert logits[0, 40] == logits[0, 300] == logits[0].max()
    assert int(ids[0]) == 40
    assert torch.equal(ids, head.head_argmax_ref(**kw))


def test_argmax_compares_dtype_rounded_logits():
    """Logits that differ in fp32 but round to the same bf16 value tie: the lowest id wins, even
    though the later id's fp32 logit is larger."""
    kw = case_kwargs("head_argmax", torch.bfloat16, label="R1")
    w = kw["w_head"]
    x_normed = norm.rmsnorm_ref(kw["x"], kw["norm_weight"], GEOM.eps).float()
    base = (x_normed[0] / x_normed[0].norm() * 4).to(torch.bfloat16)
    w[20] = base
    w[250] = base
    # Raise one element of row 250 by one bf16 ulp, towards a larger logit: pick the first
    # element whose nudge moves the fp32 logit but not its bf16 rounding.
    found = False
    for j in x_normed[0].abs().argsort(descending=True).tolist():
        toward = torch.tensor(float("inf") if x_normed[0, j] > 0 else float("-inf"))
        w[250, j] = torch.nextafter(base[j].float(), toward).to(torch.bfloat16)
        while w[250, j] == base[j]:  # nextafter in fp32 may round back: step in bf16 bits
            w[250, j] = (w[250, j].float() * (1 + 2 ** -7) + (2 ** -7 if x_normed[0, j] > 0 else -(2 ** -7))).to(
                torch.bfloat16)
        exact = torch.nn.functional.linear(x_normed.to(torch.bfloat16).float(), w.float())[0]
        logits = head.head_logits_ref(**kw)[0]
        if exact[250] > exact[20] and logits[250] == logits[20] == logits.max():
            found = True
            break
        w[250, j] = base[j]
    assert found, "could not build a bf16 tie between different fp32 logits"
    assert int(head.head_argmax(**kw)[0]) == 20
