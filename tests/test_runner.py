"""The decode runner's graph logic, exercised on a CPU.

A CUDA graph freezes every kernel argument at capture and re-reads only device memory on
replay. `FrozenReplay` does the same with the step's closure: it re-runs the closure made at
the key's first occurrence, every Python value it holds frozen then. If any position, slot,
length or token reached a step as a host value instead of through the workspace's uploaded
tables, the replayed generation would diverge from the eager one.
"""
import pytest
import torch

from vita_audio_runtime.checkpoint import random_tensors
from vita_audio_runtime.config import PRESETS
from vita_audio_runtime.engine import Engine
from vita_audio_runtime.runner import bucket

PRESET = PRESETS["tiny"]
PROMPT = list(range(40, 72))  # 32 tokens: the prefill exceeds graph_max_rows and runs eagerly


class FrozenReplay:
    def __init__(self, run):
        self.run, self.replays = run, 0

    def replay(self):
        self.replays += 1
        self.run()


@pytest.fixture(scope="module")
def tensors():
    return random_tensors(PRESET.config, torch.float32, "cpu", seed=31)


def _engine(tensors, frozen: bool, monkeypatch=None, max_batch: int = 2):
    engine = Engine(PRESET.config, {k: v.clone() for k, v in tensors.items()}, PRESET.special_tokens(),
                    PRESET.defaults, backend="torch", max_seq_len=160, max_batch=max_batch)
    if frozen:
        runner = engine.runner
        monkeypatch.setattr(runner, "use_graphs", True)
        monkeypatch.setattr(runner, "bucketed", True)
        monkeypatch.setattr(runner, "graph_max_rows", 24)
        monkeypatch.setattr(runner, "_capture", lambda run: FrozenReplay(run))
    return engine


def test_buckets():
    assert [bucket(n) for n in (1, 2, 3, 5, 11, 16, 17, 33, 112)] == [1, 2, 4, 8, 16, 16, 32, 48, 112]


# Lengths end on a whole burst, so the last burst has the steady shape.
@pytest.mark.parametrize("mode,length,llm_rows", [
    ("vanilla", 110, {1}),
    ("turbo", 110, {16}),  # 11-row LLM chunks, 11-row module steps: bucket 16
    ("boost", 109, {16, 1}),
    ("balance", 114, {8, 1, 16}),
])
def test_frozen_replays_equal_eager_steps(tensors, monkeypatch, mode, length, llm_rows):
    eager = _engine(tensors, frozen=False).generate(PROMPT, mode=mode, max_new_tokens=length, ignore_eos=True)
    engine = _engine(tensors, frozen=True, monkeypatch=monkeypatch)
    replayed = engine.generate(PROMPT, mode=mode, max_new_tokens=length, ignore_eos=True)
    graphs = engine.runner.graphs
    assert {key[1] for key in graphs if key[0] == "llm"} == llm_rows  # padded row buckets
    assert all(key[-3] <= engine.runner.graph_max_rows for key in graphs)
    assert sum(g.replays for g in graphs.values()) >= 3
    assert replayed.tokens == eager.tokens and replayed.producers == eager.producers
    # A second generation replays the same graphs.
    again = engine.generate(PROMPT, mode=mode, max_new_tokens=length, ignore_eos=True)
    assert again.tokens == eager.tokens and len(engine.runner.graphs) == len(graphs)
    assert max(rows for rows, _ in engine.runner.workspaces) <= engine.runner.graph_max_rows


def test_frozen_replays_with_two_requests_in_one_batch(tensors, monkeypatch):
    """Two requests sharing padded, replayed steps get exactly their lone eager tokens."""
    lone = _engine(tensors, frozen=False)
    want = [lone.generate(PROMPT[:p], mode=m, max_new_tokens=60, ignore_eos=True) for p, m in ((9, "turbo"), (5, "boost"))]
    engine = _engine(tensors, frozen=True, monkeypatch=monkeypatch)
    got = [engine.submit(PROMPT[:p], mode=m, max_new_tokens=60, ignore_eos=True) for p, m in ((9, "turbo"), (5, "boost"))]
    for w, g in zip(want, got):
        r = g.result(timeout=120)
        assert r.tokens == w.tokens and r.producers == w.producers
    assert sum(g.replays for g in engine.runner.graphs.values()) >= 3


def test_positions_reach_steps_only_through_the_uploaded_tables(tensors, monkeypatch):
    """Freezing a closure with wrong uploaded positions would change tokens: prove the test can tell."""
    engine = _engine(tensors, frozen=True, monkeypatch=monkeypatch)
    runner = engine.runner
    upload = runner._upload

    def zero_positions(ws, values):
        values = list(values)
        values[ws.rows:2 * ws.rows] = [0] * ws.rows
        upload(ws, values)

    monkeypatch.setattr(runner, "_upload", zero_positions)
    broken = engine.generate(PROMPT, mode="turbo", max_new_tokens=60, ignore_eos=True)
    good = _engine(tensors, frozen=False).generate(PROMPT, mode="turbo", max_new_tokens=60, ignore_eos=True)
    assert broken.tokens != good.tokens
