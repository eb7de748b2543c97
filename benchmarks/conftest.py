"""Benchmarks' test set-up: Triton runs through its CPU interpreter when no CUDA device is present.

TRITON_INTERPRET must be set before any @triton.jit function is created (as in tests/conftest.py).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
