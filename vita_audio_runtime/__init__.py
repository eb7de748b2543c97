"""vita-audio-runtime: load VITA-Audio checkpoints and generate text and audio tokens in the
four MCTP inference modes (Vanilla, Balance, Boost, Turbo) with a static KV cache and a
CUDA-graph decode loop.

    from vita_audio_runtime import Engine
    engine = Engine.from_pretrained("small")            # or a checkpoint directory
    result = engine.generate(prompt_ids, mode="turbo", max_new_tokens=128)
    request = engine.submit(prompt_ids, mode="boost")   # from any thread; requests share the batch
"""
import importlib

# Exports resolve on first use, so importing the package (e.g. for the CLI) defines no Triton
# kernel before the CLI has decided whether Triton runs through its CPU interpreter.
_EXPORTS = {"AudioChunk": "request", "Engine": "engine", "GenerationResult": "request", "Token": "request",
            "Request": "request", "QueueFullError": "request", "EngineClosedError": "request",
            "CheckpointError": "config", "VitaConfig": "config", "Mode": "schedule"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"vita_audio_runtime.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vita_audio_runtime' has no attribute {name!r}")
