"""The decode runner's graph logic, exercised on a CPU.

A CUDA graph freezes every kernel argument at capture and re-reads only device memory on
replay. `FrozenReplay` does the same with the step's closure: it re-runs the closure made at
the shape's first occurrence, every Python value it holds frozen then. If any position,
length or token reached a step as a host value instead of through the device buffers, the
replayed generation would diverge from the eager one.
"""
import pytest
import torch

from vita_audio_runtime.checkpoint import random_tensors
from vita_audio_runtime.config import PRESETS
from vita_audio_runtime.engine import Engine

PRESET = PRESETS["tiny"]


class FrozenReplay:
    def __init__(self, run):
        self.run, self.replays = run, 0

    def replay(self):
        self.replays += 1
        self.run()


@pytest.fixture(scope="module")
def tensors():
    return random_tensors(PRESET.config, torch.float32, "cpu", seed=31)


def _engine(tensors, frozen: bool, monkeypatch=None):
    engine = Engine(PRESET.config, {k: v.clone() for k, v in tensors.items()}, PRESET.special_tokens(),
                    PRESET.defaults, backend="torch", max_seq_len=160)
    if frozen:
        monkeypatch.setattr(engine.runner, "use_graphs", True)
        monkeypatch.setattr(engine.runner, "_capture", lambda run, samples: FrozenReplay(run))
    return engine


# Lengths end on a whole burst, so the last burst has the steady shape (a cut-short final burst
# is a shape of its own, with its own graph).
@pytest.mark.parametrize("mode,length,shapes", [
    ("vanilla", 110, {("llm", 1)}),
    ("turbo", 110, {("llm", 11), ("burst", (11,) * 10)}),
    ("boost", 109, {("llm", 11), ("llm", 1), ("burst", (14,) * 10)}),
    ("balance", 114, {("llm", 5), ("llm", 1), ("llm", 9), ("llm", 11), ("burst", (14,) * 10)}),
])
def test_frozen_replays_equal_eager_steps(tensors, monkeypatch, mode, length, shapes):
    prompt = list(range(40, 72))  # 32 tokens: prefill and first-use catch-ups exceed 16 rows, run eagerly
    eager = _engine(tensors, frozen=False).generate(prompt, mode=mode, max_new_tokens=length, ignore_eos=True)
    engine = _engine(tensors, frozen=True, monkeypatch=monkeypatch)
    replayed = engine.generate(prompt, mode=mode, max_new_tokens=length, ignore_eos=True)
    graphs = engine.runner.graphs
    assert {key[:2] for key in graphs} == shapes  # one graph per step shape, prefill/catch-up eager
    assert sum(g.replays for g in graphs.values()) >= 3
    assert replayed.tokens == eager.tokens and replayed.producers == eager.producers
    # A second generation replays the same graphs from its first graphable step on.
    again = engine.generate(prompt, mode=mode, max_new_tokens=length, ignore_eos=True)
    assert again.tokens == eager.tokens and len(engine.runner.graphs) == len(graphs)
    assert max(engine.runner.workspaces) <= engine.runner.graph_max_rows  # long eager steps keep nothing


def test_positions_reach_steps_only_through_the_device_buffer(tensors, monkeypatch):
    """Freezing a closure with a wrong host-side position would change tokens: prove the test can tell."""
    engine = _engine(tensors, frozen=True, monkeypatch=monkeypatch)
    runner = engine.runner
    upload = runner._upload_positions
    monkeypatch.setattr(runner, "_upload_positions", lambda values: upload({k: 0 for k in values}))
    broken = engine.generate(list(range(40, 72)), mode="turbo", max_new_tokens=60, ignore_eos=True)
    good = _engine(tensors, frozen=False).generate(list(range(40, 72)), mode="turbo", max_new_tokens=60,
                                                   ignore_eos=True)
    assert broken.tokens != good.tokens
