"""The CUDA C++ ops (vita_kernels._C) against their references.

GPU tests need a CUDA device and the built extension and are skipped, with the reason, where
either is missing. The CPU tests check what must hold everywhere: the CUDA sources compile for
sm_90/sm_80, the wrappers reject bad arguments by name, and the 'cuda' backend explains itself
when the extension is absent.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TOLERANCES
from vita_kernels import backend, cuda_ops
from vita_kernels.gate_up import norm_gate_up_ref
from vita_kernels.head import head_argmax_ref, head_logits_ref
from vita_kernels.linear import linear_ref
from vita_kernels.norm import add_rmsnorm_ref
from vita_kernels.registry import GEOMETRIES, norm_weight, ops, randn, weight

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
HAS_EXT = cuda_ops._C is not None

if not HAS_CUDA:
    _SKIP_REASON = "needs a CUDA device"
elif not HAS_EXT:
    _SKIP_REASON = ("vita_kernels._C is not built: reinstall with `pip install --no-build-isolation -e .` "
                    "(VITA_KERNELS_FORCE_CUDA_BUILD=1 says why it cannot build)")
else:
    _SKIP_REASON = ""
_REQUIRES_EXT = [pytest.mark.gpu, pytest.mark.cuda_ext,
                 pytest.mark.skipif(not (HAS_CUDA and HAS_EXT), reason=_SKIP_REASON or "n/a")]


def _ext(fn):
    """Marks a test that runs the CUDA ops: skipped, with the reason, without a GPU or _C."""
    for mark in _REQUIRES_EXT:
        fn = mark(fn)
    return fn


@pytest.fixture(autouse=True)
def _fp32_reductions_in_cublas():
    """cuBLAS may reduce split-K partials in bf16/fp16 by default; the references here must not."""
    matmul = torch.backends.cuda.matmul
    saved = (matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction)
    matmul.allow_bf16_reduced_precision_reduction = False
    matmul.allow_fp16_reduced_precision_reduction = False
    yield
    matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction = saved

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
ROWS = [1, 3, 11, 14, 16]
G7 = GEOMETRIES["7b"]
EPS = 1e-6


def _dev() -> torch.device:
    return torch.device("cuda")


def _poisoned(shape, dtype) -> torch.Tensor:
    if dtype == torch.int64:
        return torch.full(shape, -7, dtype=dtype, device=_dev())
    return torch.full(shape, float("nan"), dtype=dtype, device=_dev())


def _assert_matches(result: torch.Tensor, ref_lowp: torch.Tensor, exact: torch.Tensor, dtype) -> None:
    """Close to the same-dtype reference, and no further from the float64 answer than ~2x torch's path."""
    assert not result.isnan().any(), "output left poisoned (NaN)"
    torch.testing.assert_close(result, ref_lowp, **TOLERANCES[dtype])
    err = (result.double() - exact).abs().max().item()
    err_torch = (ref_lowp.double() - exact).abs().max().item()
    floor = torch.finfo(dtype).eps * exact.abs().max().item() * 0.5
    assert err <= 2 * err_torch + floor, f"max error {err:.3g} vs torch's {err_torch:.3g}"
    # Same rounding sequence as the reference: nearly every element is bit-identical; the rest
    # differ only where the fp32 sums (different order) straddle a rounding boundary.
    same = (result == ref_lowp).float().mean().item()
    assert same > 0.9, f"only {same:.1%} of elements equal the reference bit for bit"


# ------------------------------------------------------------------------------------ linear
LINEAR_SHAPES = [  # (label, N, K, bias, residual)
    pytest.param("odd", 333, 96, True, True, id="odd-333x96-bias-res"),
    pytest.param("odd", 77, 200, False, True, id="odd-77x200-res"),
    pytest.param("odd", 45, 1000, True, False, id="odd-45x1000-bias"),
    pytest.param("odd", 19, 8, False, False, id="odd-19x8"),
    pytest.param("7b", G7.hidden, G7.num_heads * G7.head_dim, False, True, id="7b-o_proj"),
    pytest.param("7b", G7.hidden, G7.intermediate, False, True, id="7b-down_proj"),
    pytest.param("7b", G7.hidden + 2 * G7.num_kv_heads * G7.head_dim, G7.hidden, True, False, id="7b-qkv"),
    pytest.param("7b", G7.hidden, 2 * G7.hidden, False, False, id="7b-mtp_proj"),
]


@_ext
@pytest.mark.parametrize("out_given", [True, False], ids=["out", "alloc"])
@pytest.mark.parametrize("rows", ROWS + [40], ids=lambda r: f"R{r}")
@pytest.mark.parametrize("label,n,k,has_bias,has_res", LINEAR_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_matches_reference(dtype, label, n, k, has_bias, has_res, rows, out_given, gen):
    if label == "7b" and rows == 40:
        pytest.skip("prefill rows > 16 are covered at the small shapes")
    x = randn((rows, k), dtype, _dev(), gen)
    w = weight((n, k), dtype, _dev(), gen)
    b = randn((n,), dtype, _dev(), gen) if has_bias else None
    res = randn((rows, n), dtype, _dev(), gen) if has_res else None
    out = _poisoned((rows, n), dtype) if out_given else None
    y = cuda_ops.linear_cuda(x, w, b, res, out=out)
    if out_given:
        assert y is out
    exact = linear_ref(x.double(), w.double(), None if b is None else b.double(),
                       None if res is None else res.double())
    _assert_matches(y, linear_ref(x, w, b, res), exact, dtype)



@_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_strided_rows_and_layouts(dtype, gen):
    """Row-strided x/residual/out are used in place; a transposed x is copied, same result."""
    rows, n, k = 5, 70, 136
    wide = randn((rows, k + 24), dtype, _dev(), gen)
    x = wide[:, :k]  # row stride k + 24: a multiple of 8, served without a copy
    w, res = weight((n, k), dtype, _dev(), gen), randn((rows, n + 8), dtype, _dev(), gen)[:, :n]
    out_wide = _poisoned((rows, n + 10), dtype)
    out = out_wide[:, 2:2 + n]  # misaligned start: rejected by name
    with pytest.raises(ValueError, match="out has strides"):
        cuda_ops.linear_cuda(x, w, None, res, out=out)
    y = cuda_ops.linear_cuda(x, w, None, res)
    torch.testing.assert_close(y, linear_ref(x, w, None, res), **TOLERANCES[dtype])
    xt = x.t().contiguous().t()  # column-major: copied to rows
    torch.testing.assert_close(cuda_ops.linear_cuda(xt, w, None, res), y, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ norm_gate_up
GATE_UP_SHAPES = [pytest.param(96, 200, id="odd-H96-I200"), pytest.param(136, 77 * 8 + 3, id="odd-H136-I619"),
                  pytest.param(G7.hidden, G7.intermediate, id="7b")]


@_ext
@pytest.mark.parametrize("out_given", [True, False], ids=["out", "alloc"])
@pytest.mark.parametrize("rows", ROWS + [40], ids=lambda r: f"R{r}")
@pytest.mark.parametrize("h,i", GATE_UP_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_gate_up_matches_reference(dtype, h, i, rows, out_given, gen):
    x = randn((rows, h), dtype, _dev(), gen)
    nw = norm_weight(h, dtype, _dev(), gen)
    w = weight((2 * i, h), dtype, _dev(), gen)
    out = _poisoned((rows, i), dtype) if out_given else None
    y = cuda_ops.norm_gate_up_cuda(x, nw, w, EPS, out=out)
    if out_given:
        assert y is out
    exact = norm_gate_up_ref(x.double(), nw.double(), w.double(), EPS)
    _assert_matches(y, norm_gate_up_ref(x, nw, w, EPS), exact, dtype)


# ------------------------------------------------------------------------------------ head_argmax
HEAD_SHAPES = [pytest.param(96, 333, id="odd-H96-V333"), pytest.param(200, 5003, id="odd-H200-V5003"),
               pytest.param(G7.hidden, G7.vocab, id="7b")]


@_ext
@pytest.mark.parametrize("out_given", [True, False], ids=["out", "alloc"])
@pytest.mark.parametrize("rows", ROWS, ids=lambda r: f"R{r}")
@pytest.mark.parametrize("h,v", HEAD_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_argmax_picks_a_maximum(dtype, h, v, rows, out_given, gen):
    x = randn((rows, h), dtype, _dev(), gen, scale=2.0)
    nw = norm_weight(h, dtype, _dev(), gen)
    w = weight((v, h), dtype, _dev(), gen)
    out = _poisoned((rows,), torch.int64) if out_given else None
    ids = cuda_ops.head_argmax_cuda(x, nw, w, EPS, out=out)
    if out_given:
        assert ids is out
    assert ids.dtype == torch.int64 and ids.shape == (rows,)
    assert ((ids >= 0) & (ids < v)).all(), f"ids out of range: {ids.tolist()}"
    logits = head_logits_ref(x, nw, w, EPS)
    chosen = logits.gather(1, ids[:, None]).squeeze(1)
    best = logits.max(dim=1).values
    # The fused fp32 sums may round a logit one ulp away from cuBLAS's; nothing more.
    ulp = best.abs() * 2.0 ** -(torch.finfo(dtype).nmant)
    assert (chosen >= best - 1.01 * ulp).all(), f"chosen {chosen.tolist()} below max {best.tolist()}"
    if rows >= 3:  # most rows pick the reference's exact id
        agree = (ids == head_argmax_ref(x, nw, w, EPS)).float().mean().item()
        assert agree >= 0.5, f"only {agree:.0%} of rows agree with the reference id"


@_ext
@pytest.mark.parametrize("pair", [(7, 8), (5, 4990), (0, 4999)], ids=["same-warp", "far-blocks", "ends"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_argmax_ties_pick_the_lowest_id(dtype, pair, gen):
    h, v, rows = 128, 5000, 3
    x = randn((rows, h), dtype, _dev(), gen)
    nw = norm_weight(h, dtype, _dev(), gen)
    w = weight((v, h), dtype, _dev(), gen)
    normed = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)).to(dtype) * nw
    planted = (normed[1] / normed[1].float().norm()).to(dtype)  # row 1's logit there is far above the rest
    lo, hi = pair
    w[lo] = planted
    w[hi] = planted  # identical rows: identical logits for every x row
    ids = cuda_ops.head_argmax_cuda(x, nw, w, EPS, out=_poisoned((rows,), torch.int64))
    assert head_argmax_ref(x, nw, w, EPS)[1].item() == lo  # the planted pair is the maximum
    assert ids[1].item() == lo, f"tie between ids {lo} and {hi} resolved to {ids[1].item()}"


# ------------------------------------------------------------------------------------ add_rmsnorm
@_ext
@pytest.mark.parametrize("with_residual", [True, False], ids=["add", "noadd"])
@pytest.mark.parametrize("rows", ROWS + [40], ids=lambda r: f"R{r}")
@pytest.mark.parametrize("h", [pytest.param(96, id="H96"), pytest.param(1000, id="H1000"),
                               pytest.param(G7.hidden, id="7b")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rmsnorm_matches_reference(dtype, h, rows, with_residual, gen):
    x = randn((rows, h), dtype, _dev(), gen)
    res = randn((rows, h), dtype, _dev(), gen) if with_residual else None
    w = norm_weight(h, dtype, _dev(), gen)
    y, s = cuda_ops.add_rmsnorm_cuda(x, res, w, EPS)
    y_ref, s_ref = add_rmsnorm_ref(x, res, w, EPS)
    assert torch.equal(s, s_ref), "s = x + residual is one rounding: bit-exact"
    if not with_residual:
        assert s is x
    y_out, s_out = _poisoned((rows, h), dtype), _poisoned((rows, h), dtype)
    y2, s2 = cuda_ops.add_rmsnorm_cuda(x, res, w, EPS, out=y_out, residual_out=s_out)
    assert y2 is y_out and s2 is s_out
    assert torch.equal(y2, y) and torch.equal(s2, s_ref), "destination passing gives the same bits"
    exact, _ = add_rmsnorm_ref(s_ref.double(), None, w.double(), EPS)
    _assert_matches(y, y_ref, exact, dtype)


# ------------------------------------------------------------------------------------ op level
@_ext
def test_ops_raise_named_errors_at_the_torch_op_level(gen):
    """The C++ checks guard direct torch.ops calls too (ValueError naming the tensor)."""
    dtype = torch.bfloat16
    x, w = randn((3, 64), dtype, _dev(), gen), weight((40, 64), dtype, _dev(), gen)
    with pytest.raises(ValueError, match=r"out has shape \[3, 41\], expected \[3, 40\]"):
        torch.ops.vita_kernels.linear(x, w, None, None, torch.empty(3, 41, dtype=dtype, device=_dev()))
    with pytest.raises(ValueError, match="weight has dtype"):
        torch.ops.vita_kernels.linear(x, w.half(), None, None, torch.empty(3, 40, dtype=dtype, device=_dev()))
    with pytest.raises(ValueError, match="out has dtype"):
        torch.ops.vita_kernels.head_argmax(x, w[0, :64].clone(), w, EPS, torch.empty(3, dtype=torch.int32,
                                                                                       device=_dev()))


@_ext
def test_meta_kernels_trace_shapes(gen):
    """Meta (fake) kernels accept well-formed meta tensors and reject bad shapes by name."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    x, w, out = torch.empty(4, 64, **meta), torch.empty(40, 64, **meta), torch.empty(4, 40, **meta)
    torch.ops.vita_kernels.linear(x, w, None, None, out)
    torch.ops.vita_kernels.norm_gate_up(x, torch.empty(64, **meta), torch.empty(80, 64, **meta), EPS, out)
    torch.ops.vita_kernels.head_argmax(x, torch.empty(64, **meta), w, EPS,
                                       torch.empty(4, device="meta", dtype=torch.int64))
    torch.ops.vita_kernels.add_rmsnorm(x, x, torch.empty(64, **meta), EPS, torch.empty_like(x), torch.empty_like(x))
    with pytest.raises(ValueError, match="weight has shape"):
        torch.ops.vita_kernels.linear(x, torch.empty(40, 63, **meta), None, None, out)


@_ext
def test_opcheck_schema_and_fake_tensor(gen):
    dtype = torch.bfloat16
    x, w = randn((3, 64), dtype, _dev(), gen), weight((40, 64), dtype, _dev(), gen)
    nw = norm_weight(64, dtype, _dev(), gen)
    cases = [
        (torch.ops.vita_kernels.linear.default, (x, w, None, x[:, :40].contiguous(), torch.empty(3, 40, dtype=dtype,
                                                                                                 device=_dev()))),
        (torch.ops.vita_kernels.norm_gate_up.default, (x, nw, w, EPS, torch.empty(3, 20, dtype=dtype, device=_dev()))),
        (torch.ops.vita_kernels.head_argmax.default, (x, nw, w, EPS, torch.empty(3, dtype=torch.int64, device=_dev()))),
        (torch.ops.vita_kernels.add_rmsnorm.default, (x, x.clone(), nw, EPS, torch.empty_like(x), torch.empty_like(x))),
        (torch.ops.vita_kernels.rmsnorm.default, (x, nw, EPS, torch.empty_like(x))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@_ext
def test_cuda_graph_capture_and_replay(gen):
    """Destination-passing ops capture into a CUDA graph and replay on new inputs."""
    dtype, rows, h, v = torch.bfloat16, 11, 256, 3000
    x = randn((rows, h), dtype, _dev(), gen)
    w_lin, nw = weight((h, h), dtype, _dev(), gen), norm_weight(h, dtype, _dev(), gen)
    w_gu, w_head = weight((2 * 384, h), dtype, _dev(), gen), weight((v, h), dtype, _dev(), gen)
    y, s = torch.empty_like(x), torch.empty_like(x)
    proj, mlp = torch.empty_like(x), torch.empty(rows, 384, dtype=dtype, device=_dev())
    ids = torch.empty(rows, dtype=torch.int64, device=_dev())

    def step():
        torch.ops.vita_kernels.linear(x, w_lin, None, x, proj)
        torch.ops.vita_kernels.add_rmsnorm(proj, x, nw, EPS, y, s)
        torch.ops.vita_kernels.norm_gate_up(s, nw, w_gu, EPS, mlp)
        torch.ops.vita_kernels.head_argmax(y, nw, w_head, EPS, ids)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside capture (sets the shared-memory attributes)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.copy_(randn((rows, h), dtype, _dev(), gen))
    graph.replay()
    torch.cuda.synchronize()
    want_proj = linear_ref(x, w_lin, None, x)
    torch.testing.assert_close(proj, want_proj, **TOLERANCES[dtype])
    want_y, want_s = add_rmsnorm_ref(proj, x, nw, EPS)
    torch.testing.assert_close(s, want_s, rtol=0, atol=0)
    torch.testing.assert_close(y, want_y, **TOLERANCES[dtype])
    torch.testing.assert_close(mlp, norm_gate_up_ref(s, nw, w_gu, EPS), **TOLERANCES[dtype])
    logits = head_logits_ref(y, nw, w_head, EPS)
    best = logits.max(1).values
    assert (logits.gather(1, ids[:, None]).squeeze(1) >= best - best.abs() * 2.0 ** -7).all()


@_ext
def test_registry_lists_the_cuda_impls():
    names = {s.name: s for s in ops()}
    for name, fn in cuda_ops.CUDA_IMPLS.items():
        assert names[name].impls["cuda"] is fn
    assert set(cuda_ops.CUDA_IMPLS) == {"linear", "norm_gate_up", "head_argmax", "add_rmsnorm"}
    chosen = backend.resolve_backend("cuda", "cuda")
    assert chosen.choice["linear"] == "cuda" and chosen.linear is cuda_ops.linear_cuda


# ------------------------------------------------------------------------------------ CPU tests
BAD_ARGUMENTS = [
    pytest.param(lambda t: cuda_ops.linear_cuda(t(3, 64), t(40, 32)), r"weight has shape \[40, 32\], expected \[N, K\]",
                 id="linear-weight-K"),
    pytest.param(lambda t: cuda_ops.linear_cuda(t(3, 64), t(40, 64), t(41)), r"bias has shape \[41\]",
                 id="linear-bias"),
    pytest.param(lambda t: cuda_ops.linear_cuda(t(3, 64), t(40, 64), None, t(3, 41)), r"residual has shape",
                 id="linear-residual"),
    pytest.param(lambda t: cuda_ops.linear_cuda(t(3, 64), t(40, 64), out=t(4, 40)), r"out has shape \[4, 40\]",
                 id="linear-out"),
    pytest.param(lambda t: cuda_ops.linear_cuda(t(3, 64, 1), t(40, 64)), r"x has shape \[3, 64, 1\], expected \[R, K\]",
                 id="linear-x-dims"),
    pytest.param(lambda t: cuda_ops.norm_gate_up_cuda(t(3, 64), t(63), t(80, 64), EPS), r"norm_weight has shape",
                 id="gate_up-norm_weight"),
    pytest.param(lambda t: cuda_ops.norm_gate_up_cuda(t(3, 64), t(64), t(80, 48), EPS), r"w_gate_up has shape",
                 id="gate_up-w"),
    pytest.param(lambda t: cuda_ops.head_argmax_cuda(t(3, 64), t(64), t(100, 60), EPS), r"w_head has shape",
                 id="head-w"),
    pytest.param(lambda t: cuda_ops.add_rmsnorm_cuda(t(3, 64), t(3, 60), t(64), EPS), r"residual has shape",
                 id="norm-residual"),
    pytest.param(lambda t: cuda_ops.linear_cuda(t(3, 64), t(40, 64)), r"x is on cpu, expected a CUDA tensor",
                 id="linear-cpu"),
    pytest.param(lambda t: cuda_ops.head_argmax_cuda(t(3, 64), t(64), t(100, 64), EPS), r"x is on cpu",
                 id="head-cpu"),
]


@pytest.mark.parametrize("call,message", BAD_ARGUMENTS)
def test_wrappers_name_bad_arguments(call, message):
    """Shape and device problems are caught by the Python wrappers, extension or not."""
    with pytest.raises(ValueError, match=message):
        call(lambda *shape: torch.randn(*shape).to(torch.bfloat16))


@_ext
@pytest.mark.parametrize("call,message", [
    pytest.param(lambda t: cuda_ops.linear_cuda(t(3, 64).float(), t(40, 64)), r"x has dtype torch.float32", id="fp32"),
    pytest.param(lambda t: cuda_ops.linear_cuda(t(3, 64), t(40, 64).half()), r"weight has dtype torch.float16",
                 id="mixed"),
    pytest.param(lambda t: cuda_ops.linear_cuda(t(3, 60), t(40, 60)), r"multiple of 8", id="K-not-8"),
    pytest.param(lambda t: cuda_ops.head_argmax_cuda(t(3, 64), t(64), t(100, 64), EPS, out=t(3)),
                 r"out has dtype torch.bfloat16, expected torch.int64", id="head-out-dtype"),
    pytest.param(lambda t: cuda_ops.norm_gate_up_cuda(t(3, 64), t(64), t(81, 64), EPS), r"even first dimension",
                 id="gate_up-odd"),
    pytest.param(lambda t: cuda_ops.add_rmsnorm_cuda(t(3, 64), None, t(64), -1.0), r"eps must be", id="eps"),
])
def test_wrappers_name_bad_arguments_on_gpu(call, message):
    with pytest.raises(ValueError, match=message):
        call(lambda *shape: torch.randn(*shape, device="cuda").to(torch.bfloat16))


def test_cuda_backend_explains_a_missing_extension(monkeypatch):
    monkeypatch.setattr(backend, "cuda_extension", lambda: None)
    with pytest.raises(ValueError, match=r"needs the compiled extension vita_kernels\._C"):
        backend.resolve_backend("cuda", "cuda")


def test_cuda_impls_follow_the_extension():
    """CUDA_IMPLS is empty without _C, and the registry files exactly these under 'cuda'."""
    if cuda_ops._C is None:
        assert cuda_ops.CUDA_IMPLS == {}
    registered = {s.name for s in ops() if "cuda" in s.impls}
    assert registered == set(cuda_ops.CUDA_IMPLS)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the CUDA compile check needs it")
def test_cuda_sources_compile_for_sm90_and_sm80():
    """Every csrc/*.cu compiles without warnings for sm_90 and sm_80, with no register spills."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_cuda_compile.py"), "--archs", "90,80"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all CUDA sources compile cleanly" in proc.stdout
