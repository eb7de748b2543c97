"""CUDA C++ implementations of the bandwidth-critical ops (the optional `vita_kernels._C`).

Each wrapper has exactly its reference's signature, validates its arguments (a ValueError
naming the argument and what was expected), then calls the destination-passing torch op
`torch.ops.vita_kernels.<op>` that csrc/bindings.cpp registers. The ops themselves never
allocate, so a runtime capturing CUDA graphs can also call them directly with preallocated
outputs. `CUDA_IMPLS` maps op names to wrappers and is empty where the extension is not built;
`vita_kernels.registry.ops()` files them under the "cuda" key.

Supported: CUDA tensors in bfloat16 or float16, reduced dimension (K or H) a multiple of 8.
Activations may be row-strided; inputs in any other layout are copied to a contiguous one.
"""
from __future__ import annotations

from typing import Callable

import torch

try:
    from vita_kernels import _C
except ImportError:  # not built here (CPU-only torch, no nvcc, or VITA_KERNELS_SKIP_CUDA_BUILD=1)
    _C = None

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)


def _shape(t: torch.Tensor) -> str:
    return f"[{', '.join(str(s) for s in t.shape)}]"


def _check(t, name: str, shape: tuple, layout: str, like: torch.Tensor | None = None, dtype=None) -> None:
    """`t` is a tensor of `shape` (None entries are free) with `like`'s dtype (or `dtype`)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(e is not None and s != e for s, e in zip(t.shape, shape)):
        expected = ", ".join("*" if e is None else str(e) for e in shape)
        raise ValueError(f"{name} has shape {_shape(t)}, expected {layout} = [{expected}]")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if like is None and t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}, expected torch.bfloat16 or torch.float16")
    if like is not None and dtype is None and t.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {like.dtype} (the dtype of x)")


def _check_devices(x: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Everything on x's device, and that device a GPU (checked after shapes and dtypes)."""
    if x.device.type != "cuda":
        raise ValueError(f"x is on {x.device}, expected a CUDA tensor (the 'cuda' backend runs on GPUs)")
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected {x.device} (the device of x)")


def _check_k(k: int, what: str) -> None:
    if k % 8 != 0:
        raise ValueError(f"{what} = {k} must be a multiple of 8: the CUDA kernels move 16-byte vectors")


def _rows_ok(t: torch.Tensor) -> bool:
    """The kernels' activation layout: contiguous last dim, row stride a multiple of 8, 16-byte aligned."""
    if t.data_ptr() % 16 != 0:
        return False
    if t.shape[0] <= 1:
        return t.shape[-1] <= 1 or t.stride(-1) == 1
    return t.stride(1) == 1 and t.stride(0) % 8 == 0 and t.stride(0) >= t.shape[1]


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if _rows_ok(t) else t.clone(memory_format=torch.contiguous_format)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


def _check_out(out: torch.Tensor, name: str = "out") -> None:
    if not _rows_ok(out):
        raise ValueError(f"{name} has strides {tuple(out.stride())} and data pointer {out.data_ptr():#x}: expected a "
                         "contiguous last dimension, a row stride that is a multiple of 8 and 16-byte alignment")


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    return float(eps)


def linear_cuda(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    out_rows: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = residual + (x @ W^T + bias).to(dtype); bias and residual optional.

    x: [R, K]; weight: [N, K]; bias: [N]; residual: [R, N]; all bf16 or fp16 on one GPU.
    Returns [R, N]. See vita_kernels.linear.linear_ref. out_rows (a scatter into `out`) is a
    second step here (index_copy_), where the Triton kernel stores in place; counters are unused
    (no split-K).
    """
    if out_rows is not None:
        out.index_copy_(0, out_rows, linear_cuda(x, weight, bias, residual))
        return out
    _check(x, "x", (None, None), "[R, K]")
    rows, k = x.shape
    _check(weight, "weight", (None, k), "[N, K]", like=x)
    n = weight.shape[0]
    _check_k(k, "K (x.shape[1])")
    if bias is not None:
        _check(bias, "bias", (n,), "[N]", like=x)
    if residual is not None:
        _check(residual, "residual", (rows, n), "[R, N]", like=x)
    if out is not None:
        _check(out, "out", (rows, n), "[R, N]", like=x)
    _check_devices(x, weight=weight, bias=bias, residual=residual, out=out)
    if out is None:
        out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    else:
        _check_out(out)
    if rows == 0 or n == 0:
        return out
    torch.ops.vita_kernels.linear(_rows(x), _dense(weight), None if bias is None else _dense(bias),
                                  None if residual is None else _rows(residual), out)
    return out


def norm_gate_up_cuda(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = silu(h @ W_gate^T) * (h @ W_up^T), h = rmsnorm(x); each product rounded to dtype.

    x: [R, H]; norm_weight: [H]; w_gate_up: [2I, H] (gate rows first). Returns [R, I].
    See vita_kernels.gate_up.norm_gate_up_ref.
    """
    _check(x, "x", (None, None), "[R, H]")
    rows, h = x.shape
    _check(norm_weight, "norm_weight", (h,), "[H]", like=x)
    _check(w_gate_up, "w_gate_up", (None, h), "[2I, H]", like=x)
    if w_gate_up.shape[0] % 2 != 0:
        raise ValueError(f"w_gate_up has shape {_shape(w_gate_up)}, expected [2I, H] with an even first dimension "
                         "(gate rows, then up rows)")
    _check_k(h, "H (x.shape[1])")
    eps = _check_eps(eps)
    inter = w_gate_up.shape[0] // 2
    if out is not None:
        _check(out, "out", (rows, inter), "[R, I]", like=x)
    _check_devices(x, norm_weight=norm_weight, w_gate_up=w_gate_up, out=out)
    if out is None:
        out = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    else:
        _check_out(out)
    if rows == 0 or inter == 0:
        return out
    torch.ops.vita_kernels.norm_gate_up(_rows(x), _dense(norm_weight), _dense(w_gate_up), eps, out)
    return out


def head_argmax_cuda(
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
    """ids = argmax(head_logits(x)), the lowest id among equal maxima. Returns [R] int64.

    x: [R, H] raw final hidden rows (R <= 1024); norm_weight: [H]; w_head: [V, H]. Logits are
    compared after rounding to the model dtype. See vita_kernels.head.head_argmax_ref. The row
    gather (x_rows) and the emit epilogue (tokens, seen) are separate torch ops here, where the
    Triton kernel folds them in; counters are unused.
    """
    if x_rows is not None or tokens is not None or seen is not None:
        from vita_kernels.head import write_emitted

        ids = head_argmax_cuda(x if x_rows is None else x.index_select(0, x_rows), norm_weight, w_head, eps, out)
        write_emitted(ids, tokens, token_index, seen, seen_rows)
        return ids
    _check(x, "x", (None, None), "[R, H]")
    rows, h = x.shape
    _check(norm_weight, "norm_weight", (h,), "[H]", like=x)
    _check(w_head, "w_head", (None, h), "[V, H]", like=x)
    _check_k(h, "H (x.shape[1])")
    if rows > 1024:
        raise ValueError(f"x has shape {_shape(x)}: head_argmax handles at most 1024 rows")
    eps = _check_eps(eps)
    if out is not None:
        _check(out, "out", (rows,), "[R]", like=x, dtype=torch.int64)
    _check_devices(x, norm_weight=norm_weight, w_head=w_head, out=out)
    if out is None:
        out = torch.empty((rows,), dtype=torch.int64, device=x.device)
    elif not out.is_contiguous():
        raise ValueError(f"out has strides {tuple(out.stride())}, expected a contiguous [R] tensor")
    if rows == 0:
        return out
    torch.ops.vita_kernels.head_argmax(_rows(x), _dense(norm_weight), _dense(w_head), eps, out)
    return out


def add_rmsnorm_cuda(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual (in x's dtype, or s = x without residual); y = rmsnorm(s). Returns (y, s).

    x, residual: [R, H]; weight: [H]; H a multiple of 8, at most 32768. `out` receives y and
    `residual_out` receives s, as in the Triton launcher (without residual and without
    residual_out, s is x itself, as in the reference). See vita_kernels.norm.add_rmsnorm_ref.
    """
    _check(x, "x", (None, None), "[R, H]")
    rows, h = x.shape
    _check(weight, "weight", (h,), "[H]", like=x)
    _check_k(h, "H (x.shape[1])")
    if h > 32768:
        raise ValueError(f"x has shape {_shape(x)}: add_rmsnorm handles H <= 32768")
    eps = _check_eps(eps)
    if residual is not None:
        _check(residual, "residual", (rows, h), "[R, H]", like=x)
    for name, t in (("out", out), ("residual_out", residual_out)):
        if t is not None:
            _check(t, name, (rows, h), "[R, H]", like=x)
    _check_devices(x, residual=residual, weight=weight, out=out, residual_out=residual_out)
    for name, t in (("out", out), ("residual_out", residual_out)):
        if t is not None:
            _check_out(t, name)
    y = torch.empty((rows, h), dtype=x.dtype, device=x.device) if out is None else out
    if residual is None:
        s = x
        if residual_out is not None:
            s = residual_out.copy_(x)
        if rows > 0:
            torch.ops.vita_kernels.rmsnorm(_rows(x), _dense(weight), eps, y)
        return y, s
    s = torch.empty_like(y) if residual_out is None else residual_out
    if rows > 0:
        torch.ops.vita_kernels.add_rmsnorm(_rows(x), _rows(residual), _dense(weight), eps, y, s)
    return y, s


CUDA_IMPLS: dict[str, Callable] = (
    {"linear": linear_cuda, "norm_gate_up": norm_gate_up_cuda, "head_argmax": head_argmax_cuda,
     "add_rmsnorm": add_rmsnorm_cuda}
    if _C is not None
    else {}
)
