"""Backend `triton` against backend `torch`: identical greedy tokens in all four modes.

On a CPU this runs the Triton kernels through the interpreter on the tiny preset in fp32.
"""
import pytest
import torch

from conftest import DEVICE, HAS_CUDA
from vita_audio_runtime.checkpoint import random_tensors
from vita_audio_runtime.config import PRESETS
from vita_audio_runtime.engine import Engine
from vita_kernels.backend import resolve_backend

PRESET = PRESETS["tiny"]
MODES = ["vanilla", "balance", "boost", "turbo"]


@pytest.fixture(scope="module")
def tensors():
    return random_tensors(PRESET.config, torch.float32, DEVICE, seed=21)


def _engine(tensors, backend, **kwargs):
    return Engine(PRESET.config, {k: v.clone() for k, v in tensors.items()}, PRESET.special_tokens(),
                  PRESET.defaults, backend=backend, max_seq_len=96, **kwargs)


def test_triton_backend_resolves_every_op_to_a_fused_kernel():
    backend = resolve_backend("triton", DEVICE)
    assert set(backend.choice.values()) == {"triton"}, backend.choice


@pytest.mark.parametrize("mode", MODES)
def test_triton_backend_tokens_equal_torch_backend(tensors, mode):
    prompt = [11, 3, 200, 7, 7]
    max_new = 36 if mode == "balance" else 24
    ref = _engine(tensors, "torch").generate(prompt, mode=mode, max_new_tokens=max_new, ignore_eos=True)
    fused = _engine(tensors, "triton").generate(prompt, mode=mode, max_new_tokens=max_new, ignore_eos=True)
    assert fused.producers == ref.producers
    assert fused.tokens == ref.tokens


def test_triton_backend_sampling_path_matches_torch(tensors):
    """The logits head feeds the same device sampler: same seed, same tokens."""
    kwargs = dict(mode="turbo", max_new_tokens=14, do_sample=True, temperature=0.8, top_k=30,
                  repetition_penalty=1.2, seed=3, ignore_eos=True)
    ref = _engine(tensors, "torch").generate([1, 2, 3], **kwargs)
    fused = _engine(tensors, "triton").generate([1, 2, 3], **kwargs)
    assert fused.tokens == ref.tokens


@pytest.mark.skipif(HAS_CUDA, reason="CPU behaviour of the auto backend")
def test_auto_backend_on_cpu_is_the_reference():
    assert set(resolve_backend("auto", "cpu").choice.values()) == {"torch"}


def test_cuda_backend_falls_back_to_triton_for_fp32_per_op():
    """The CUDA kernels are bf16/fp16 only: an fp32 model gets Triton for those ops, not a failure."""
    from vita_kernels.backend import _pick
    from vita_kernels.registry import OpSpec

    spec = OpSpec("linear", lambda: None, lambda *a: [], impls={"triton": object(), "cuda": object()})
    cuda = torch.device("cuda")
    assert _pick(spec, "cuda", cuda, torch.float32, {}) == "triton"
    assert _pick(spec, "cuda", cuda, torch.bfloat16, {}) == "cuda"
    assert _pick(spec, "auto", cuda, torch.float32, {"linear": "cuda"}) == "triton"
