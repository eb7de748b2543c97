"""Launches per step, counted on a CPU: every Triton kernel launch and every torch op that would
launch a GPU kernel (views, allocations without a fill and metadata ops launch nothing).

A greedy MCTP module step makes 7 launches, whatever the geometry: mtp_input (gathering its
ids and hidden rows), qkv_rope_cache, attention, o_proj, gate_up, down_proj (writing its rows
into the hidden history) and the head (argmax, token and seen-mask writes). Split-K, split-KV
and the head's argmax reduce inside their own launch (the last program to arrive), so the 7B
configuration launches no more than the CPU one. Each step also uploads its row tables with
one host-to-device copy (outside a captured graph), counted separately.
"""
from __future__ import annotations

import os

import pytest
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from vita_audio_runtime.engine import Engine
from vita_audio_runtime.scheduler import Span
from vita_kernels.sampling import SamplingParams

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="counts Triton launches through the CPU interpreter")

# aten ops that launch nothing on a GPU: views, metadata, allocation without initialisation.
NO_LAUNCH = {"view", "_unsafe_view", "slice", "select", "unbind", "alias", "as_strided", "t", "transpose",
             "expand", "detach", "empty", "empty_strided", "lift_fresh", "unsqueeze", "squeeze", "permute",
             "reshape", "split", "split_with_sizes", "narrow", "_reshape_alias"}


class LaunchCounter(TorchDispatchMode):
    """Records Triton kernel launches (by name) and launching torch ops (by aten name)."""

    def __init__(self):
        super().__init__()
        self.triton: list[str] = []
        self.torch: list[str] = []
        self.copies = 0
        self._patched = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in NO_LAUNCH:
            self.torch.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        from triton.runtime import interpreter

        run, counter = interpreter.InterpretedFunction.run, self

        def counted(fn, *args, **kwargs):
            counter.triton.append(fn.fn.__name__)
            with _disable_current_modes():  # the interpreter's own tensor work is not a launch
                return run(fn, *args, **kwargs)

        self._patched = (interpreter.InterpretedFunction, run)
        interpreter.InterpretedFunction.run = counted
        return super().__enter__()

    def __exit__(self, *exc):
        cls, run = self._patched
        cls.run = run
        return super().__exit__(*exc)

    @property
    def launches(self) -> int:
        return len(self.triton) + len(self.torch)


@pytest.fixture(scope="module")
def engine():
    engine = Engine.from_pretrained("tiny", device="cpu", backend="triton", max_batch=2)
    yield engine
    engine.close()


def _count(engine, step) -> LaunchCounter:
    step()  # first: workspaces made, nothing else
    with LaunchCounter() as counter:
        runner = engine.runner
        upload = runner._upload

        def counted_upload(ws, values):
            counter.copies += 1
            with _disable_current_modes():
                upload(ws, values)

        runner._upload = counted_upload
        try:
            step()
        finally:
            del runner._upload
    return counter


@pytest.mark.parametrize("slots", [1, 2], ids=["batch1", "batch2"])
def test_greedy_mctp_module_step_makes_7_launches(engine, slots):
    runner, greedy = engine.runner, [SamplingParams()] * slots
    for slot in range(slots):
        runner.reset_slot(slot, list(range(1, 30)), seed=0)
    runner.llm_step([Span(s, 0, 29, emit=True) for s in range(slots)], greedy)
    spans = [Span(s, 10 + s, 11, emit=True) for s in range(slots)]
    counter = _count(engine, lambda: runner.mtp_step(3, spans, greedy))
    print(f"MCTP module step: {counter.launches} launches {counter.triton + counter.torch}, "
          f"{counter.copies} table upload")
    assert counter.launches == 7 and not counter.torch, counter.triton + counter.torch
    assert counter.copies == 1


def test_launches_per_llm_step_are_reported(engine):
    runner, greedy = engine.runner, [SamplingParams()]
    runner.reset_slot(0, list(range(1, 30)), seed=0)
    counter = _count(engine, lambda: runner.llm_step([Span(0, 0, 29, emit=True)], greedy))
    layers = engine.cfg.num_llm_layers
    print(f"LLM step ({layers} layers): {counter.launches} launches, {counter.copies} table upload")
    assert counter.launches == 5 * layers + 3  # token and embedding gathers, 5 per layer, the head
