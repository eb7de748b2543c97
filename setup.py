"""Build script: pure Python everywhere; the optional CUDA extension is added where it can build.

`vita_kernels._C` (csrc/*.cu + csrc/bindings.cpp) is built with ninja through torch's
CUDAExtension when the installing environment has a CUDA-enabled torch and nvcc; the project is
installed there with `pip install --no-build-isolation --no-deps -e .` so that torch is visible
here. Anywhere else the package installs as pure Python and the Triton/torch backends still work.

Environment:
  VITA_KERNELS_SKIP_CUDA_BUILD=1   never build the extension
  VITA_KERNELS_FORCE_CUDA_BUILD=1  build it or fail, saying why it cannot
  VITA_KERNELS_CUDA_ARCHS="90;80"  compute capabilities to compile for (default "90;80")
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _arch_flags() -> list[str]:
    archs = os.environ.get("VITA_KERNELS_CUDA_ARCHS", "90;80")
    flags = []
    for arch in filter(None, (a.strip() for a in archs.replace(",", ";").split(";"))):
        if not arch.isdigit() or int(arch) < 80:
            raise SystemExit(f"VITA_KERNELS_CUDA_ARCHS entry {arch!r} is not supported: expected compute "
                             "capabilities like '90;80' (bf16 tensor-core MMA needs 80 or newer)")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    if not flags:
        raise SystemExit("VITA_KERNELS_CUDA_ARCHS is empty: expected compute capabilities like '90;80'")
    return flags


def _why_cuda_cannot_build() -> str | None:
    """None when the extension can be built here, else the reason."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        return (f"torch is not importable in the build environment ({exc}); install with "
                "`pip install --no-build-isolation -e .` into an environment that has a CUDA-enabled torch")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)"
    nvcc = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
    if not nvcc.exists() and shutil.which("nvcc") is None:
        return f"nvcc not found under CUDA_HOME={cpp_extension.CUDA_HOME} nor on PATH"
    return None


def _extension_kwargs() -> dict:
    if _flag("VITA_KERNELS_SKIP_CUDA_BUILD"):
        if _flag("VITA_KERNELS_FORCE_CUDA_BUILD"):
            raise SystemExit("VITA_KERNELS_SKIP_CUDA_BUILD=1 and VITA_KERNELS_FORCE_CUDA_BUILD=1 contradict each other")
        return {}
    reason = _why_cuda_cannot_build()
    if reason is not None:
        if _flag("VITA_KERNELS_FORCE_CUDA_BUILD"):
            raise SystemExit(f"VITA_KERNELS_FORCE_CUDA_BUILD=1 but the CUDA extension vita_kernels._C cannot be "
                             f"built: {reason}")
        print(f"vita-kernels: building without the CUDA extension: {reason}", file=sys.stderr)
        return {}

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = ["csrc/bindings.cpp"] + sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
    extension = CUDAExtension(
        name="vita_kernels._C",
        sources=sources,
        include_dirs=[str(CSRC)],
        # The C++ standard is left to torch (c++17 or c++20 by version); the arch flags replace
        # torch's own TORCH_CUDA_ARCH_LIST detection.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", *_arch_flags()]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_extension_kwargs())
