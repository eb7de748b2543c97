"""The torch reference runtime against transformers' Qwen2 and the spec's formulas (CPU, fp32)."""
import pytest
import torch

from hf_reference import HFReference
from vita_audio_runtime.checkpoint import random_tensors
from vita_audio_runtime.config import PRESETS
from vita_audio_runtime.engine import Engine
from vita_audio_runtime.model import VitaModel
from vita_audio_runtime.scheduler import Span
from vita_kernels.backend import resolve_backend
from vita_kernels.head import head_logits_ref

CFG = PRESETS["tiny"].config
MODES = ["vanilla", "balance", "boost", "turbo", "1,12,2,3"]  # the last: runs longer than N fall through


@pytest.fixture(scope="module")
def tensors():
    return random_tensors(CFG, torch.float32, "cpu", seed=7)


@pytest.fixture(scope="module")
def hf(tensors):
    return HFReference(CFG, tensors)


def _engine(tensors, backend="torch"):
    preset = PRESETS["tiny"]
    return Engine(CFG, {k: v.clone() for k, v in tensors.items()}, preset.special_tokens(), preset.defaults,
                  backend=backend, max_seq_len=128)


@pytest.mark.parametrize("prompt_len", [1, 5, 23])
def test_llm_logits_equal_transformers_qwen2(tensors, hf, prompt_len):
    gen = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, CFG.vocab_size, (prompt_len,), generator=gen).tolist()
    engine = _engine(tensors)
    runner, model = engine.runner, engine.model
    runner.reset_slot(0, prompt, seed=0)
    ws, window, _ = runner.prepare([Span(0, 0, prompt_len, emit=False)], ahead=0)
    model.llm_step(runner.state, ws, window)
    ours = head_logits_ref(runner.state.hidden[0, :prompt_len], model.final_norm, model.lm_head, CFG.rms_norm_eps)
    _, theirs = hf.llm_hidden_and_logits(prompt)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("module", [0, 3, 9])
def test_mctp_module_equals_formula(tensors, hf, module):
    """Module k over a 9-row history equals W_proj @ [norm_e(E x_{j+k+1}); norm_h(h_j)] -> layer -> norm."""
    gen = torch.Generator().manual_seed(module)
    rows = 9
    tokens = torch.randint(0, CFG.vocab_size, (rows + module + 1,), generator=gen).tolist()
    h_k = torch.randn(rows, CFG.hidden_size, generator=gen) * 2  # raw input hidden of module k
    engine = _engine(tensors)
    runner, model = engine.runner, engine.model
    runner.reset_slot(0, tokens, seed=0)
    runner.state.hidden[module, :rows] = h_k
    ws, window, _ = runner.prepare([Span(0, 0, rows, emit=False)], ahead=module + 1)
    model.mtp_step(module, runner.state, ws, window)
    ours = head_logits_ref(runner.state.hidden[module + 1, :rows], model.final_norm, model.lm_head, CFG.rms_norm_eps)
    h_in = hf.llm.model.norm(h_k)  # the module consumes the post-final-norm hidden
    theirs = hf.llm.lm_head(hf.module_forward(module, tokens, h_in))
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prompt_len", [1, 4, 13])
def test_cached_generation_equals_recompute_from_scratch(tensors, hf, mode, prompt_len):
    gen = torch.Generator().manual_seed(100 + prompt_len)
    prompt = torch.randint(0, CFG.vocab_size, (prompt_len,), generator=gen).tolist()
    max_new = 40 if mode == "balance" else 30  # Balance's late modules first run after 16 tokens
    result = _engine(tensors).generate(prompt, mode=mode, max_new_tokens=max_new, ignore_eos=True)
    tokens, made = hf.generate(prompt, mode, max_new)
    assert result.producers == made
    assert result.tokens == tokens


def test_modes_share_their_common_prefix(tensors):
    """Boost and Turbo agree up to their first difference in schedule (index 12)."""
    engine = _engine(tensors)
    prompt = [3, 1, 4, 1, 5]
    boost = engine.generate(prompt, mode="boost", max_new_tokens=20, ignore_eos=True).tokens
    turbo = engine.generate(prompt, mode="turbo", max_new_tokens=20, ignore_eos=True).tokens
    assert boost[:12] == turbo[:12]


def test_engine_is_reusable_and_deterministic(tensors):
    engine = _engine(tensors)
    a = engine.generate([9, 8, 7], mode="turbo", max_new_tokens=25, ignore_eos=True).tokens
    engine.generate([1] * 30, mode="balance", max_new_tokens=30, ignore_eos=True)
    b = engine.generate([9, 8, 7], mode="turbo", max_new_tokens=25, ignore_eos=True).tokens
    assert a == b


def test_backend_torch_resolves_to_references():
    backend = resolve_backend("torch", "cpu")
    assert set(backend.choice.values()) == {"torch"}
    model_tensors = random_tensors(CFG, torch.float32, "cpu", seed=1)
    model = VitaModel(CFG, model_tensors, backend, max_positions=64)
    assert len(model.layers) == CFG.num_layers_total and len(model.mtp) == CFG.num_mtp_modules
