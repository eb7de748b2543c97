"""Engine behaviour a caller relies on: bad input named before any work, EOS, streaming, timings."""
import pytest
import torch

from vita_audio_runtime.checkpoint import random_tensors
from vita_audio_runtime.config import PRESETS, GenerationDefaults, SpecialTokens
from vita_audio_runtime.engine import Engine
from vita_audio_runtime.request import AudioChunk, AudioChunker, Token

PRESET = PRESETS["tiny"]
CFG = PRESET.config


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny", device="cpu", backend="torch", max_seq_len=64)


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt_ids=[]), "prompt_ids is empty"),
    (dict(prompt_ids=[1, CFG.vocab_size]), rf"prompt_ids\[1\] = {CFG.vocab_size} is outside the vocabulary"),
    (dict(prompt_ids=[-1]), r"prompt_ids\[0\] = -1 is outside"),
    (dict(prompt_ids=[1.5]), r"prompt_ids\[0\] = 1.5 is not an integer"),
    (dict(prompt_ids=[1] * 60, max_new_tokens=5), r"60 tokens\) \+ max_new_tokens \(5\) = 65 exceeds .* 64"),
    (dict(prompt_ids=[1], max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(prompt_ids=[1], mode="warp"), "unknown mode 'warp'"),
    (dict(prompt_ids=[1], mode=[1, 10, 4]), "even"),
    (dict(prompt_ids=[1], mode="0,10"), "first count"),
    (dict(prompt_ids=[1], do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(prompt_ids=[1], do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(prompt_ids=[1], top_k=-3), "top_k must be >= 0"),
    (dict(prompt_ids=[1], repetition_penalty=0.0), "repetition_penalty must be > 0"),
])
def test_bad_generation_arguments_are_named(engine, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(device="tpu"), "not a valid torch device|not supported"),
    (dict(device="cuda"), "no CUDA device is available" if not torch.cuda.is_available() else "^$"),
    (dict(dtype="int8"), "dtype 'int8' is not supported"),
    (dict(backend="fastest"), "unknown backend 'fastest'"),
    (dict(backend="cuda"), "backend 'cuda' needs"),
    (dict(max_seq_len=1), "max_seq_len must be >= 2"),
])
def test_bad_engine_arguments_are_named(kwargs, match):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match=match):
        Engine.from_pretrained("tiny", **{"device": "cpu", **kwargs})


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a preset"):
        Engine.from_pretrained("/no/such/dir", device="cpu")


def test_result_reports_producers_and_timings(engine):
    r = engine.generate([1, 2, 3], mode="turbo", max_new_tokens=23, ignore_eos=True)
    assert len(r.tokens) == len(r.producers) == 23
    assert r.producer_names[:3] == ["llm", "mtp0", "mtp1"] and r.producer_names[11] == "llm"
    t = r.timings
    assert 0 < t["ttft_s"] <= t["first_chunk_s"] <= t["total_s"]
    assert t["tokens_per_s"] == pytest.approx(23 / t["total_s"])
    assert r.stop_reason == "length"


def _biased_engine(token: int, scale: float = 50.0) -> Engine:
    """A tiny model whose head favours `token` (its lm_head row scaled up: always at 50, sometimes at 2)."""
    tensors = random_tensors(CFG, torch.float32, seed=11)
    tensors["model.norm.weight"] = torch.ones(CFG.hidden_size)
    gen = torch.Generator().manual_seed(0)
    tensors["lm_head.weight"][token] = scale * torch.sign(torch.randn(CFG.hidden_size, generator=gen))
    return Engine(CFG, tensors, PRESET.special_tokens(), PRESET.defaults, backend="torch", max_seq_len=64)


def test_eos_stops_generation_unless_ignored():
    eos = PRESET.special_tokens().eos_ids[0]
    engine = _biased_engine(eos)
    full = engine.generate([1, 2, 3], mode="vanilla", max_new_tokens=8, ignore_eos=True)
    assert eos in full.tokens, "the biased head should produce EOS somewhere"
    first = full.tokens.index(eos)
    stopped = engine.generate([1, 2, 3], mode="vanilla", max_new_tokens=8)
    assert stopped.tokens == full.tokens[: first + 1] and stopped.stop_reason == "eos"


@pytest.mark.parametrize("mode", ["boost", "turbo", "balance"])
def test_eos_inside_a_burst_truncates_exactly_there(mode):
    """The stopped run is the ignore-EOS run cut right after its first EOS, whichever path made it."""
    eos = PRESET.special_tokens().eos_ids[1]
    engine = _biased_engine(eos, scale=2.0)
    full = engine.generate([4, 4, 2], mode=mode, max_new_tokens=30, ignore_eos=True)
    first = full.tokens.index(eos)
    assert full.producer_names[first] == "mtp1"  # mid-burst: modules 2.. of that burst are discarded
    stopped = engine.generate([4, 4, 2], mode=mode, max_new_tokens=30)
    assert stopped.tokens == full.tokens[: first + 1]
    assert stopped.producers == full.producers[: first + 1]


def test_chunker_splits_text_and_audio_segments():
    s = SpecialTokens(eos_ids=(1,), begin_of_audio=10, end_of_audio=11, audio_offset=20)
    chunker = AudioChunker(s)
    events = []
    for i, t in enumerate([5, 10, 20, 27, 21, 11, 6, 10, 25, 7, 10, 22]):
        events += chunker.push(t, i)
    events += chunker.finish()
    assert events == [Token(5, 0), AudioChunk([0, 7, 1], [1, 2, 3, 4, 5]), Token(6, 6),
                      AudioChunk([5], [7, 8], complete=False), Token(7, 9), AudioChunk([2], [10, 11], complete=False)]


def test_stream_yields_the_same_tokens_as_generate(engine):
    kwargs = dict(mode="boost", max_new_tokens=30, ignore_eos=True)
    tokens = engine.generate([7, 7, 1], **kwargs).tokens
    s = engine.special
    rebuilt = []
    for event in engine.stream([7, 7, 1], **kwargs):
        if isinstance(event, Token):
            rebuilt.append(event.id)
        else:
            rebuilt += [s.begin_of_audio] + [c + s.audio_offset for c in event.codes]
            rebuilt += [s.end_of_audio] if event.complete else []
    assert rebuilt == tokens


def test_sampling_defaults_come_from_generation_config():
    tensors = random_tensors(CFG, torch.float32, seed=2)
    defaults = GenerationDefaults(eos_token_id=(1,), do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
                                  repetition_penalty=1.1)
    engine = Engine(CFG, tensors, PRESET.special_tokens(), defaults, backend="torch", max_seq_len=64)
    p = engine.sampling_params()
    assert (p.do_sample, p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (True, 0.7, 20, 0.9, 1.1)
    assert engine.sampling_params(do_sample=False, top_k=5).top_k == 5
    a = engine.generate([3, 4], mode="boost", max_new_tokens=25, seed=5, ignore_eos=True).tokens
    b = engine.generate([3, 4], mode="boost", max_new_tokens=25, seed=5, ignore_eos=True).tokens
    c = engine.generate([3, 4], mode="boost", max_new_tokens=25, seed=6, ignore_eos=True).tokens
    assert a == b and a != c


def test_memory_report_counts_the_static_buffers(engine):
    engine.generate([1, 2, 3], max_new_tokens=3)  # creates the step workspaces
    report = engine.memory_report()
    h, s = CFG.hidden_size, 64 * (engine.max_batch + 1)  # a region per slot, plus the scratch region
    assert report["kv_cache"] == 2 * CFG.num_layers_total * CFG.num_key_value_heads * s * CFG.head_dim * 4
    assert report["weights"] > 0 and report["workspaces"] > 0 and report["graph_pool"] == 0
    assert report["state_other"] >= CFG.num_mtp_modules * s * h * 4


def test_preset_too_large_for_the_device_is_refused_before_allocating(monkeypatch):
    from vita_audio_runtime import engine as engine_module

    monkeypatch.setattr(engine_module, "_available_bytes", lambda device: 1_000_000)
    with pytest.raises(ValueError, match=r"preset .small. needs \d+\.\d GB \(float32 weights and KV cache\) but cpu has 0\.0 GB"):
        Engine.from_pretrained("small", device="cpu")


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("mtp_projs.3.weight"), r"missing tensor mtp_projs\.3\.weight"),
    (lambda t: t.update({"mtp_projs.3.weight": torch.zeros(64, 64)}), r"mtp_projs\.3\.weight has shape \[64, 64\]"),
    (lambda t: t.update({"lm_head.weight": t["lm_head.weight"].double()}), r"lm_head\.weight is torch\.float64"),
    (lambda t: t.update({"extra.weight": torch.zeros(1)}), r"unexpected tensor extra\.weight"),
])
def test_engine_constructor_validates_its_tensors(edit, match):
    from vita_audio_runtime.config import CheckpointError

    tensors = random_tensors(CFG, torch.float32, seed=1)
    edit(tensors)
    with pytest.raises(CheckpointError, match=match):
        Engine(CFG, tensors, PRESET.special_tokens(), PRESET.defaults, backend="torch", max_seq_len=64)


def test_max_seq_len_beyond_the_position_range_is_refused():
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        Engine.from_pretrained("tiny", device="cpu", max_seq_len=CFG.max_position_embeddings)


def test_generate_uses_the_checkpoint_mode_by_default():
    tensors = random_tensors(CFG, torch.float32, seed=2)
    defaults = GenerationDefaults(eos_token_id=(1,), mtp_inference_mode=(1, 10))
    engine = Engine(CFG, tensors, PRESET.special_tokens(), defaults, backend="torch", max_seq_len=64)
    assert engine.generate([3, 4], max_new_tokens=13, ignore_eos=True).producers[11:] == [-1, 0]
