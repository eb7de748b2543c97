"""Shared test set-up: the interpreter switch, the tolerance table, markers and seeding.

TRITON_INTERPRET must be set before any @triton.jit function is created, so it is set here,
before the package is imported, whenever no CUDA device is present.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# Absolute/relative tolerances per dtype for element-wise comparisons against a reference run
# in the same dtype. fp32 on the CPU interpreter is exact arithmetic in another order; on a GPU
# tl.dot may use TF32, hence the looser GPU fp32 row. bf16 keeps 8 mantissa bits (2^-8 = 0.4%).
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4) if not HAS_CUDA else dict(atol=2e-3, rtol=2e-3),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; CPU CI runs the interpreter tests")


@pytest.fixture
def gen():
    """A fresh, seeded CPU generator per test: inputs are random but reproducible."""
    return torch.Generator().manual_seed(1234)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device; CPU CI runs the interpreter tests"))
