"""Which rows each slot runs at a tick: continuous batching that keeps the MCTP semantics.

A slot holds one request and walks its schedule (`schedule.steps`) exactly as a lone request
would; batching never changes which path produces a token or which rows a step covers. At each
tick the scheduler groups the slots by their next step: every slot whose next step is an LLM
step joins one variable-length LLM step, every slot in a burst joins the module-by-module
burst. A prompt is prefilled in chunks of at most `prefill_chunk` rows, one chunk per tick, so a
new request delays the others by one bounded chunk per tick (the same chunking alone or
batched, so a request's rows never depend on its neighbours). Pure Python: no device work.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator

from vita_audio_runtime.request import RequestState
from vita_audio_runtime.schedule import LLM, Step, steps


@dataclass(frozen=True)
class Span:
    """Rows first..first+rows-1 of the slot's sequence; `emit`: its last row's head picks a token."""

    slot: int
    first: int
    rows: int
    emit: bool


class SlotState:
    """A running request's place in its schedule: tokens so far and rows each path has seen."""

    def __init__(self, request: RequestState, slot: int, num_modules: int, prefill_chunk: int):
        p = request.params
        self.request, self.slot = request, slot
        self.prefill_chunk = prefill_chunk
        self.total = len(p.prompt)  # tokens in the slot's buffer (prompt + generated)
        self.llm_rows = 0  # rows the LLM has consumed
        self.module_rows = [0] * num_modules  # rows module k has consumed
        self._steps: Iterator[Step] = steps(p.mode, num_modules, p.max_new_tokens)
        self.step: Step | None = next(self._steps, None)

    def llm_span(self) -> Span:
        """The LLM rows to run now: everything unseen, at most one prefill chunk."""
        rows = min(self.total - self.llm_rows, self.prefill_chunk)
        return Span(self.slot, self.llm_rows, rows, emit=self.llm_rows + rows == self.total)

    def module_span(self, k: int) -> Span:
        """Module k over every row it has not seen (its catch-up included), emitting."""
        return Span(self.slot, self.module_rows[k], self.llm_rows - self.module_rows[k], emit=True)

    def advance_llm(self, span: Span) -> list[int]:
        """After the LLM ran `span`: the producers of the tokens it made ([] mid-prefill)."""
        self.llm_rows += span.rows
        if not span.emit:
            return []
        self.total += 1
        self.step = next(self._steps, None)
        return [LLM]

    def advance_burst(self) -> list[int]:
        """After the burst's modules 0..B-1 ran: their producers."""
        b = self.step.modules
        self.module_rows[:b] = [self.llm_rows] * b
        self.total += b
        self.step = next(self._steps, None)
        return list(range(b))


class Scheduler:
    """Slots, the waiting queue and the tick plan. Called by the engine, under its lock or by its one driving thread."""

    def __init__(self, max_batch: int, max_queue: int, num_modules: int, prefill_chunk: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.max_batch, self.max_queue = max_batch, max_queue
        self.num_modules, self.prefill_chunk = num_modules, prefill_chunk
        self.waiting: deque[RequestState] = deque()
        self.running: dict[int, SlotState] = {}  # slot -> state

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def admit(self) -> list[SlotState]:
        """Move waiting requests into free slots (dropping ones cancelled while they waited)."""
        admitted = []
        free = [s for s in range(self.max_batch) if s not in self.running]
        while self.waiting and free:
            request = self.waiting.popleft()
            if request.cancelled:
                request._finish("cancelled")
                continue
            state = SlotState(request, free.pop(0), self.num_modules, self.prefill_chunk)
            self.running[state.slot] = state
            request._start()
            admitted.append(state)
        return admitted

    def plan(self) -> tuple[list[SlotState], list[SlotState]]:
        """(slots taking an LLM step, slots taking a burst) at this tick."""
        llm = [s for s in self.running.values() if s.step.is_llm]
        burst = [s for s in self.running.values() if not s.step.is_llm]
        return llm, burst

    def release(self, slot: int) -> None:
        del self.running[slot]
