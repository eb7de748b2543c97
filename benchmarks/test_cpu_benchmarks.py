"""Host-side costs on the CPU, with pytest-benchmark: schedule expansion, the decode loop's
per-step overhead on the tiny preset, checkpoint loading.

CI runs these once as tests (`--benchmark-disable` in pyproject's addopts); to time them:

    pytest benchmarks/test_cpu_benchmarks.py --benchmark-enable
"""
import pytest
import torch

from vita_audio_runtime.checkpoint import (
    expected_tensor_shapes,
    load_checkpoint,
    random_tensors,
    write_random_checkpoint,
)
from vita_audio_runtime.config import PRESETS
from vita_audio_runtime.engine import Engine
from vita_audio_runtime.schedule import LLM, producers, steps

TINY = PRESETS["tiny"]
MODULES = TINY.config.num_mtp_modules


@pytest.mark.parametrize("mode", ["vanilla", "balance", "boost", "turbo"])
def test_schedule_expansion(benchmark, mode):
    plan = benchmark(lambda: list(steps(mode, MODULES, 4096)))
    made = producers(mode, MODULES, 4096)
    assert sum(step.tokens for step in plan) == 4096
    assert sum(step.is_llm for step in plan) == made.count(LLM)
    # Each burst is modules 0..B-1 in order, exactly where the producers say.
    flat = [p for step in plan for p in ([LLM] if step.is_llm else range(step.modules))]
    assert flat == made
    first = {"vanilla": [0, 0, 0], "balance": [0, 4, 0], "boost": [0, 10, 0], "turbo": [0, 10, 0]}[mode]
    assert [step.modules for step in plan[:3]] == first


@pytest.fixture(scope="module")
def tiny_engine():
    return Engine.from_pretrained("tiny", device="cpu", backend="torch", max_seq_len=192)


@pytest.mark.parametrize("mode", ["vanilla", "turbo"])
def test_host_loop_overhead_per_step(benchmark, tiny_engine, mode):
    """The whole decode loop on a model whose device work is negligible: what is timed is the
    host side of each step (schedule, position upload, token read, Python)."""
    new = 128
    prompt = list(range(1, 33))
    result = benchmark(tiny_engine.generate, prompt, mode=mode, max_new_tokens=new, do_sample=False,
                       ignore_eos=True)
    n_steps = len(list(steps(mode, MODULES, new)))
    benchmark.extra_info.update(steps=n_steps, us_per_step=1e6 * result.timings["total_s"] / n_steps)
    assert len(result.tokens) == new and result.stop_reason == "length"
    assert result.producers == producers(mode, MODULES, new)
    assert all(0 <= t < TINY.config.vocab_size for t in result.tokens)
    assert n_steps == (new if mode == "vanilla" else 2 * -(-new // (1 + MODULES)))


def test_sharded_checkpoint_load(benchmark, tmp_path):
    path = write_random_checkpoint(tmp_path / "tiny", TINY, seed=3, shard_bytes=64 << 10)
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    ckpt = benchmark(load_checkpoint, path, "cpu")
    expected = expected_tensor_shapes(ckpt.config)
    assert {name: tuple(t.shape) for name, t in ckpt.tensors.items()} == expected
    written = random_tensors(TINY.config, torch.float32, "cpu", seed=3)
    assert all(torch.equal(ckpt.tensors[name], written[name]) for name in expected)
