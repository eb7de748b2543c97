"""The CUDA-graph decode loop: graph replays equal eager steps bit for bit (same backend, same
kernels, same shapes: only the launch mechanism differs), and replays allocate nothing.

How the fused bf16 path compares with a reference (where identical tokens are not the bar) is
tests/test_teacher_forced.py."""
import pytest
import torch

from vita_audio_runtime.checkpoint import random_tensors
from vita_audio_runtime.config import PRESETS
from vita_audio_runtime.engine import Engine
from vita_audio_runtime.scheduler import Span

pytestmark = pytest.mark.gpu
MODES = ["vanilla", "balance", "boost", "turbo"]


def _engine(preset, dtype, backend, graphs, tensors):
    """Engines share the weight tensors (nothing writes them): a 7B copy is 20 GB."""
    p = PRESETS[preset]
    return Engine(p.config, dict(tensors), p.special_tokens(), p.defaults, backend=backend, max_seq_len=512,
                  cuda_graphs=graphs)


@pytest.fixture(scope="module")
def tiny_tensors():
    return random_tensors(PRESETS["tiny"].config, torch.float32, "cuda", seed=5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", MODES)
def test_graph_loop_equals_eager_loop(tiny_tensors, backend, mode):
    prompt = list(range(3, 35))
    eager = _engine("tiny", torch.float32, backend, False, tiny_tensors)
    graphs = _engine("tiny", torch.float32, backend, True, tiny_tensors)
    a = eager.generate(prompt, mode=mode, max_new_tokens=120, ignore_eos=True)
    b = graphs.generate(prompt, mode=mode, max_new_tokens=120, ignore_eos=True)
    assert len(graphs.runner.graphs) > 0
    assert b.tokens == a.tokens and b.producers == a.producers
    again = graphs.generate(prompt, mode=mode, max_new_tokens=120, ignore_eos=True)  # all replays now
    assert again.tokens == a.tokens


def test_graph_loop_sampling_equals_eager(tiny_tensors):
    kwargs = dict(mode="boost", max_new_tokens=60, do_sample=True, temperature=0.9, top_k=50, top_p=0.95,
                  repetition_penalty=1.1, seed=11, ignore_eos=True)
    a = _engine("tiny", torch.float32, "triton", False, tiny_tensors).generate(list(range(1, 20)), **kwargs)
    b = _engine("tiny", torch.float32, "triton", True, tiny_tensors).generate(list(range(1, 20)), **kwargs)
    assert a.tokens == b.tokens


def test_replays_allocate_nothing(tiny_tensors):
    """After capture, replaying the Turbo steady-state shapes allocates no device memory at all."""
    engine = _engine("tiny", torch.float32, "triton", True, tiny_tensors)
    engine.generate(list(range(3, 35)), mode="turbo", max_new_tokens=100, ignore_eos=True)  # captures
    params = [engine.sampling_params()]
    runner = engine.runner
    assert ("llm", 16, 1, True) in runner.graphs and ("mtp", 9, 16, 1, True) in runner.graphs  # 11 rows padded
    torch.cuda.synchronize()
    allocations = torch.cuda.memory_stats()["allocation.all.allocated"]
    for first in range(40, 100, 11):
        runner.llm_step([Span(0, first, 11, emit=True)], params)
        for k in range(10):
            runner.mtp_step(k, [Span(0, first, 11, emit=True)], params)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocations
    assert engine.memory_report()["graph_pool"] > 0


@pytest.fixture(scope="module")
def tensors_7b():
    return random_tensors(PRESETS["7b"].config, torch.bfloat16, "cuda", seed=0)


@pytest.mark.parametrize("mode", MODES)
def test_7b_graph_equals_eager_bf16(tensors_7b, mode):
    """At the real geometry in bf16 too: a graph replays exactly the eager step's kernels."""
    prompt = list(range(100, 132))
    eager = _engine("7b", torch.bfloat16, "triton", False, tensors_7b)
    a = eager.generate(prompt, mode=mode, max_new_tokens=48, ignore_eos=True)
    del eager
    graphs = _engine("7b", torch.bfloat16, "triton", True, tensors_7b)
    b = graphs.generate(prompt, mode=mode, max_new_tokens=48, ignore_eos=True)
    assert len(graphs.runner.graphs) > 0
    assert b.producers == a.producers
    differ = [i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y]
    assert not differ, f"{len(differ)} of {len(a.tokens)} tokens differ, the first at index {differ[:1]}"
