"""Every fused op beside its reference, with representative cases.

Tests, `python -m vita_kernels.check` and the benchmarks iterate over `OPS` rather than
repeating the list. An op's implementations are keyed by backend ("triton", "cuda", ...);
each takes exactly the reference's arguments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch


@dataclass(frozen=True)
class Geometry:
    """The model dimensions an op case is drawn from."""

    name: str
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    cache_len: int
    rows: tuple[int, ...]
    eps: float = 1e-6
    rope_theta: float = 1e6


GEOMETRIES = {
    # Small, odd sizes for the CPU interpreter: every mask and tail path is exercised.
    "tiny": Geometry("tiny", hidden=96, intermediate=200, num_heads=6, num_kv_heads=2, head_dim=16,
                     vocab=333, cache_len=48, rows=(1, 3, 11)),
    # The released 7B geometry (GPU): decode row, Turbo's 11 rows, Boost's 14.
    "7b": Geometry("7b", hidden=3584, intermediate=18944, num_heads=28, num_kv_heads=4, head_dim=128,
                   vocab=168072, cache_len=512, rows=(1, 11, 14)),
}


@dataclass
class Case:
    """One set of inputs for an op. `mutated` names the arguments the op writes in place."""

    name: str
    kwargs: dict
    mutated: tuple[str, ...] = ()
    bytes_moved: int = 0  # the fewest bytes the op must read + write (roofline floor)


@dataclass(frozen=True)
class OpSpec:
    """A fused op: its reference (the specification), implementations per backend, cases."""

    name: str
    ref: Callable
    cases: Callable[[Geometry, torch.dtype, torch.device, torch.Generator], list[Case]]
    impls: dict[str, Callable] = field(default_factory=dict)
    # "close": tensors within tolerance; "argmax": the chosen id's reference score is a maximum
    # within tolerance (ties and near-ties may legitimately pick another id).
    compare: str = "close"


def randn(shape, dtype, device, gen, scale=1.0) -> torch.Tensor:
    """Fresh normal values, reproducible from the CPU generator `gen`.

    On a GPU they are drawn there from a seed taken from `gen`: the 7B head alone is 600M
    values, far too slow to draw on a CPU and copy over.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(dtype=dtype)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    local = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=local, dtype=torch.float32, device=device) * scale).to(dtype=dtype)


def weight(shape, dtype, device, gen) -> torch.Tensor:
    """A weight scaled like a trained layer's (unit-variance outputs for unit-variance inputs)."""
    return randn(shape, dtype, device, gen, scale=1.0 / math.sqrt(shape[-1]))


def norm_weight(n, dtype, device, gen) -> torch.Tensor:
    return (1.0 + 0.1 * torch.randn(n, generator=gen)).to(device=device, dtype=dtype)


def cache_position(geom: Geometry, rows: int) -> int:
    """A cache slot for row 0 that leaves earlier, already-filled rows to attend to."""
    return min(geom.cache_len - rows, 5 + 3 * rows)


def ops() -> list[OpSpec]:
    """All registered ops, in chain order."""
    from vita_kernels import attention, cuda_ops, gate_up, head, linear, mtp_input, norm, qkv_rope

    specs = [mtp_input.SPEC, qkv_rope.SPEC, attention.SPEC, linear.SPEC, gate_up.SPEC, head.SPEC_ARGMAX,
             head.SPEC_LOGITS, norm.SPEC]
    # The CUDA C++ implementations (empty where vita_kernels._C is not built) join under "cuda".
    return [replace(s, impls={**s.impls, "cuda": cuda_ops.CUDA_IMPLS[s.name]}) if s.name in cuda_ops.CUDA_IMPLS
            else s for s in specs]


def get_op(name: str) -> OpSpec:
    for spec in ops():
        if spec.name == name:
            return spec
    raise KeyError(f"unknown op {name!r}; known: {[s.name for s in ops()]}")
