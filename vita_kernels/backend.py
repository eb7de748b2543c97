"""Kernel backends: which implementation of each fused op the runtime calls.

A backend is chosen explicitly and resolved once: `torch` (the references, runs anywhere),
`triton` (the fused Triton kernels; on a CPU only under TRITON_INTERPRET=1), `cuda` (the CUDA
C++ extension for the ops it has, Triton for the rest) and `auto` (the reference on a CPU;
on a GPU, per op, the implementation that measured fastest, see `auto_choice`). Nothing is
patched at import time and no global state is rebound.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch

from vita_kernels.registry import OpSpec, ops

BACKENDS = ("auto", "triton", "cuda", "torch")

# Per op, the implementation `auto` uses on a GPU, as measured by `benchmarks/bench_ops.py
# --write-auto-choice` ({"device_name": ..., "choice": {op: impl}}). Ops without a measurement use Triton.
AUTO_CHOICE_FILE = Path(__file__).with_name("auto_choice.json")


def auto_choice(device: torch.device, path: Path = AUTO_CHOICE_FILE) -> dict[str, str]:
    """The per-op preference measured on this GPU model, or {} where none has been recorded."""
    if device.type != "cuda" or not path.exists():
        return {}
    record = json.loads(path.read_text())
    if record.get("device_name") != torch.cuda.get_device_name(device):
        return {}
    return dict(record.get("choice", {}))


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, and on the CPU under the interpreter."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def cuda_extension():
    """The compiled `vita_kernels._C` extension, or None where it was not built."""
    try:
        from vita_kernels import _C
    except ImportError:
        return None
    return _C


class KernelBackend:
    """The fused-op implementations one engine calls, resolved once: `backend.linear(...)`.

    `choice` maps each op name to the implementation it resolved to ("torch", "triton", ...).
    """

    def __init__(self, name: str, impls: dict[str, Callable], choice: dict[str, str]):
        self.name = name
        self.choice = dict(choice)
        for op_name, fn in impls.items():
            setattr(self, op_name, fn)

    def __repr__(self) -> str:
        return f"KernelBackend({self.name!r}, {self.choice})"


# The CUDA C++ kernels are written for the half-precision model dtypes.
CUDA_DTYPES = (torch.bfloat16, torch.float16)


def _pick(spec: OpSpec, name: str, device: torch.device, dtype: torch.dtype | None, measured: dict[str, str]) -> str:
    if name == "torch":
        return "torch"
    if name == "triton":
        return "triton" if "triton" in spec.impls else "torch"
    cuda_ok = "cuda" in spec.impls and (dtype is None or dtype in CUDA_DTYPES)
    if name == "cuda":
        return "cuda" if cuda_ok else _pick(spec, "triton", device, dtype, measured)
    # auto
    if device.type != "cuda":
        return "torch"
    preferred = measured.get(spec.name, "triton")
    if preferred == "cuda" and not cuda_ok:
        preferred = "triton"
    return preferred if preferred in spec.impls else "torch"


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype | None = None) -> KernelBackend:
    """Resolve a backend name for a device (and the model dtype, where known) into one
    implementation per op, or raise why not. `cuda` falls back to Triton per op where the
    extension lacks the op or the dtype (fp32)."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name == "triton" and not triton_runs_on(device):
        raise ValueError(
            f"backend 'triton' cannot run on device {device}: Triton needs a CUDA device, or "
            "TRITON_INTERPRET=1 set before vita_kernels is imported to run on the CPU"
        )
    if name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' needs a CUDA device, got {device}")
        if cuda_extension() is None:
            raise ValueError(
                "backend 'cuda' needs the compiled extension vita_kernels._C, which is not built here; "
                "reinstall with a CUDA-enabled torch and nvcc (VITA_KERNELS_FORCE_CUDA_BUILD=1 to see why)"
            )
    impls, choice = {}, {}
    measured = auto_choice(device) if name == "auto" else {}
    for spec in ops():
        picked = _pick(spec, name, device, dtype, measured)
        choice[spec.name] = picked
        impls[spec.name] = spec.ref if picked == "torch" else spec.impls[picked]
    return KernelBackend(name, impls, choice)
