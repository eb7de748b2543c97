"""The GPU benchmark suite: one harness, one script per thing measured, `run_all` to run them.

    python -m benchmarks.run_all                 # on a CUDA machine: results under benchmarks/results/
    python -m benchmarks.run_all --smoke         # anywhere: plumbing check, not a measurement

Nothing here imports a kernel module at import time: `run_all.main` first decides whether
Triton runs through its CPU interpreter (TRITON_INTERPRET must be set before any @triton.jit).
"""
