"""vita-kernels: fused kernels for VITA-Audio's MCTP chain and decoder layers.

Each op family lives in its own module with its PyTorch reference (`<op>_ref`, the
specification and CPU fallback), its Triton kernel and its public launcher. The registry
(`vita_kernels.registry.ops()`) lists them; `vita_kernels.backend.resolve_backend` picks one
implementation per op for an engine.
"""
__version__ = "0.1.0"
