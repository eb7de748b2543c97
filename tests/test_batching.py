"""Many requests on one engine: every request gets exactly the tokens and producers it gets
alone, whoever shares its batch, however it arrives (ticks apart, from threads, as interleaved
generators, through asyncio), and however its neighbours end (EOS, length, cancellation)."""
from __future__ import annotations

import asyncio
import gc
import threading
from collections import Counter
from dataclasses import replace

import pytest
import torch

from vita_audio_runtime.checkpoint import random_tensors
from vita_audio_runtime.config import PRESETS
from vita_audio_runtime.engine import Engine
from vita_audio_runtime.request import EngineClosedError, QueueFullError

PRESET = PRESETS["tiny"]
CFG = PRESET.config
# (prompt length, mode, max_new_tokens): all four modes, custom lists whose runs exceed N (10
# modules) or end mid-burst, prompts of 1 to 30 tokens, lengths ending anywhere in a burst.
MIX = [(13, "turbo", 40), (1, "vanilla", 23), (30, "balance", 63), (4, "boost", 50), (7, "1,12,2,3", 37),
       (20, "2,5", 29), (9, "turbo", 17), (3, "balance", 45)]


@pytest.fixture(scope="module")
def tensors():
    return random_tensors(CFG, torch.float32, "cpu", seed=7)


def _engine(tensors, backend="torch", special=None, **kwargs) -> Engine:
    return Engine(CFG, {k: v.clone() for k, v in tensors.items()}, special or PRESET.special_tokens(),
                  PRESET.defaults, backend=backend, max_seq_len=128, **kwargs)


def _prompt(length: int, salt: int) -> list[int]:
    gen = torch.Generator().manual_seed(1000 * salt + length)
    return torch.randint(0, CFG.vocab_size, (length,), generator=gen).tolist()


def _requests(mix=MIX, **params):
    return [dict(prompt_ids=_prompt(p, i), mode=m, max_new_tokens=n, ignore_eos=True, **params)
            for i, (p, m, n) in enumerate(mix)]


@pytest.fixture(scope="module")
def lone(tensors):
    """Each request of MIX generated alone, on an engine with a single slot."""
    engine = _engine(tensors, max_batch=1)
    results = [engine.generate(**kw) for kw in _requests()]
    engine.close()
    return results


def _same(got, want):
    assert got.tokens == want.tokens and got.producers == want.producers
    assert got.stop_reason == want.stop_reason


def test_requests_arriving_at_different_ticks_equal_alone(tensors, lone):
    """Eight requests on four slots: four join at once, the others wait in the queue or arrive
    while the first ones are mid-generation."""
    engine = _engine(tensors, max_batch=4)
    kws = _requests()
    first = engine.submit(**kws[0])
    events = iter(first)
    next(events), next(events)  # the first request is under way
    handles = [first] + [engine.submit(**kw) for kw in kws[1:4]]
    results = [h.result(timeout=300) for h in handles[1:3]]  # two have finished
    handles += [engine.submit(**kw) for kw in kws[4:]]
    for i, handle in enumerate(handles):
        _same(handle.result(timeout=300), lone[i])
    assert results[0].tokens == lone[1].tokens
    engine.close()


def test_triton_backend_batched_equals_alone(tensors):
    """The fused kernels with sequences in separate cache regions (Triton interpreter, fp32)
    give each request the tokens the reference gives it alone."""
    mix = [(5, "turbo", 14), (11, "1,12,2,3", 15), (2, "vanilla", 4)]
    kws = _requests(mix)
    alone = _engine(tensors, backend="torch", max_batch=1)
    want = [alone.generate(**kw) for kw in kws]
    engine = _engine(tensors, backend="triton", max_batch=3)
    handles = [engine.submit(**kw) for kw in kws]
    for handle, w in zip(handles, want):
        _same(handle.result(timeout=600), w)


def test_eos_at_different_steps_equals_alone(tensors, lone):
    """With a common id as EOS, requests stop at different steps (mid-burst included) and the
    others keep their exact tokens."""
    eos = Counter(t for r in lone for t in r.tokens).most_common(1)[0][0]
    special = replace(PRESET.special_tokens(), eos_ids=(eos,))
    kws = [{**kw, "ignore_eos": False} for kw in _requests()]
    alone = _engine(tensors, special=special, max_batch=1)
    want = [alone.generate(**kw) for kw in kws]
    stops = {len(w.tokens) for w in want if w.stop_reason == "eos"}
    assert len(stops) >= 2, "the chosen EOS id should end at least two requests at different steps"
    engine = _engine(tensors, special=special, max_batch=4)
    handles = [engine.submit(**kw) for kw in kws]
    for handle, w in zip(handles, want):
        _same(handle.result(timeout=300), w)


def test_sampled_tokens_depend_only_on_the_request_seed(tensors):
    sampled = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2)
    kws = [{**kw, **sampled, "seed": 11 + i} for i, kw in enumerate(_requests(MIX[:4]))]
    kws.append(_requests(MIX[4:5])[0])  # a greedy neighbour
    alone = _engine(tensors, max_batch=1)
    want = [alone.generate(**kw) for kw in kws]
    engine = _engine(tensors, max_batch=5)
    handles = [engine.submit(**kw) for kw in kws]
    for handle, w in zip(handles, want):
        _same(handle.result(timeout=300), w)
    assert want[0].tokens != alone.generate(**{**kws[0], "seed": 99}).tokens  # the seed matters


def test_threads_calling_generate_get_their_own_tokens(tensors, lone):
    engine = _engine(tensors, max_batch=3)
    kws = _requests()
    results: dict[int, object] = {}

    def call(i):
        results[i] = engine.generate(**kws[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(kws))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for i in range(len(kws)):
        _same(results[i], lone[i])


def test_interleaved_generators_in_one_thread(tensors, lone):
    engine = _engine(tensors, max_batch=2)
    kws = _requests()
    streams = [engine.stream(**kws[0]), engine.stream(**kws[2])]
    got = [[], []]
    live = [True, True]
    while any(live):
        for i, s in enumerate(streams):
            if live[i]:
                try:
                    got[i].append(next(s))
                except StopIteration:
                    live[i] = False
    want = [list(_lone_events(engine, kws[0])), list(_lone_events(engine, kws[2]))]
    assert got == want


def _lone_events(engine, kw):
    return engine.stream(**kw)


def test_astream_serves_concurrent_tasks(tensors, lone):
    engine = _engine(tensors, max_batch=2)
    kws = _requests()

    async def collect(kw):
        return [event async for event in engine.astream(**kw)]

    async def main():
        return await asyncio.gather(*(collect(kws[i]) for i in (1, 3, 6)))

    got = asyncio.run(main())
    for events, i in zip(got, (1, 3, 6)):
        assert events == list(engine.stream(**kws[i]))


def test_cancel_frees_the_slot_and_keeps_a_prefix(tensors, lone):
    engine = _engine(tensors, max_batch=1)
    kws = _requests()
    long = engine.submit(**kws[2])
    events = iter(long)
    next(events)
    follower = engine.submit(**kws[1])  # waits for the only slot
    long.cancel()
    result = long.result(timeout=300)
    assert result.stop_reason == "cancelled"
    assert 0 < len(result.tokens) < len(lone[2].tokens)
    assert result.tokens == lone[2].tokens[:len(result.tokens)]
    _same(follower.result(timeout=300), lone[1])


def test_abandoned_request_frees_its_slot(tensors, lone):
    engine = _engine(tensors, max_batch=1)
    kws = _requests()
    handle = engine.submit(**{**kws[2], "max_new_tokens": 90})
    state = handle._state
    del handle
    gc.collect()
    _same(engine.generate(**kws[1]), lone[1])
    assert state.done and state.stop_reason == "cancelled"


def test_full_queue_is_refused_with_a_clear_error(tensors):
    engine = _engine(tensors, max_batch=1, max_queue=1)
    kws = _requests()
    a = engine.submit(**kws[2])
    b = engine.submit(**kws[3])
    with pytest.raises(QueueFullError, match=r"all 1 slots are busy .* \(max_queue 1\)"):
        engine.submit(**kws[4])
    a.cancel(), b.cancel()
    a.result(timeout=300), b.result(timeout=300)
    assert engine.generate(**kws[1]).tokens  # accepted again once there is room


def test_bad_arguments_are_refused_before_queueing(tensors):
    engine = _engine(tensors, max_batch=1)
    with pytest.raises(ValueError, match="is outside the vocabulary"):
        engine.submit([CFG.vocab_size])
    with pytest.raises(ValueError, match="seed must be an integer"):
        engine.submit([1, 2], seed="x")
    with pytest.raises(ValueError, match="unknown mode"):
        engine.submit([1, 2], mode="fast")
    assert engine.scheduler.idle


def test_close_ends_running_requests_and_refuses_new_ones(tensors):
    engine = _engine(tensors, max_batch=1)
    handle = engine.submit(**{**_requests()[2], "max_new_tokens": 90})
    next(iter(handle))
    engine.close()
    assert handle.result(timeout=60).stop_reason == "cancelled"
    with pytest.raises(EngineClosedError, match="closed"):
        engine.submit([1, 2, 3])


def test_iterating_a_request_twice_is_refused(tensors):
    engine = _engine(tensors, max_batch=1)
    handle = engine.submit([1, 2, 3], max_new_tokens=3)
    assert list(handle)
    with pytest.raises(RuntimeError, match="already being consumed"):
        list(handle)
