"""A generation request as its caller sees it: parameters in; events, a result and timings out.

The thread driving the engine's loop produces into a request (`_push`, `_finish`); any thread (or
an asyncio task, through `Engine.astream`) consumes from it. Nothing here touches the device.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from vita_audio_runtime.config import SpecialTokens
from vita_audio_runtime.schedule import LLM
from vita_kernels.sampling import SamplingParams


def producer_name(producer: int) -> str:
    return "llm" if producer == LLM else f"mtp{producer}"


class QueueFullError(RuntimeError):
    """Every slot is busy and the waiting queue holds max_queue requests already."""


class EngineClosedError(RuntimeError):
    """The engine was closed (or failed) before the request finished."""


@dataclass
class Token:
    """A generated id outside any audio segment (text, EOS, a stray marker or code)."""

    id: int
    producer: int  # LLM (-1) or MCTP module k


@dataclass
class AudioChunk:
    """The codes of one audio segment (ids between begin- and end-of-audio, minus the offset)."""

    codes: list[int]
    producers: list[int]
    complete: bool = True  # False: generation stopped inside the segment


class AudioChunker:
    """Turns a token stream into Token and AudioChunk events as soon as each is decidable.

    Without audio ids (a checkpoint that names none) every id is a Token event.
    """

    def __init__(self, special: SpecialTokens):
        self.special = special
        self.codes: list[int] | None = None  # inside a segment when not None
        self.producers: list[int] = []

    def push(self, token: int, producer: int) -> list[Token | AudioChunk]:
        s = self.special
        if not s.has_audio:
            return [Token(token, producer)]
        if self.codes is None:
            if token == s.begin_of_audio:
                self.codes, self.producers = [], [producer]
                return []
            return [Token(token, producer)]
        if token == s.end_of_audio:
            chunk = AudioChunk(self.codes, self.producers + [producer])
            self.codes, self.producers = None, []
            return [chunk]
        if s.is_audio(token):
            self.codes.append(token - s.audio_offset)
            self.producers.append(producer)
            return []
        # Text inside a segment ends it early: flush what was collected, then the token.
        chunk = AudioChunk(self.codes, self.producers, complete=False)
        self.codes, self.producers = None, []
        return [chunk, Token(token, producer)]

    def finish(self) -> list[AudioChunk]:
        if self.codes is None:
            return []
        chunk = AudioChunk(self.codes, self.producers, complete=False)
        self.codes = None
        return [chunk]


@dataclass
class GenerationResult:
    tokens: list[int]  # the new ids
    producers: list[int]  # per new id: LLM (-1) or module k
    stop_reason: str  # "eos", "length" or "cancelled"
    timings: dict[str, float | None] = field(default_factory=dict)
    audio_chunks: list[AudioChunk] = field(default_factory=list)

    @property
    def producer_names(self) -> list[str]:
        return [producer_name(p) for p in self.producers]


@dataclass(frozen=True)
class RequestParams:
    """Everything that decides a request's tokens; validated before it is queued."""

    prompt: tuple[int, ...]
    mode: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    seed: int
    ignore_eos: bool


_DONE = object()  # end-of-events marker in a request's event queue


class RequestState:
    """The engine's side of one generation: what the decode loop produces into and callers read
    from. Callers hold it through a `Request` handle."""

    def __init__(self, request_id: int, params: RequestParams, special: SpecialTokens, num_mtp_modules: int,
                 drive=None):
        """drive(ready, timeout=None): the engine's loop, run by a waiting consumer until ready()."""
        self.id = request_id
        self._drive = drive
        self.params = params
        self._chunker = AudioChunker(special)
        self._eos = frozenset(special.eos_ids)
        self._first_chunk_tokens = 1 + num_mtp_modules
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._consumed = False
        self.tokens: list[int] = []
        self.producers: list[int] = []
        self.audio_chunks: list[AudioChunk] = []
        self.token_times: list[float] = []  # seconds from the slot's start to each id's host read
        self.stop_reason: str | None = None
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self.started: float | None = None  # when it got a slot
        self.timings: dict[str, float | None] = {"queue_s": None, "ttft_s": None, "first_chunk_s": None,
                                                 "first_audio_chunk_s": None}

    # -- the consumer's side ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[Token | AudioChunk]:
        """The events, each once: a second iteration (or one after another consumer) is refused."""
        if self._consumed:
            raise RuntimeError(f"request {self.id}'s events are already being consumed")
        self._consumed = True
        while True:
            if self._drive is not None and self._events.empty():
                self._drive(lambda: not self._events.empty())
            event = self._events.get()
            if event is _DONE:
                break
            yield event
        if self.error is not None:
            raise self.error

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the end (EOS, length, cancellation) and return the whole result."""
        if self._drive is not None:
            self._drive(self._done.is_set, timeout)
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return GenerationResult(list(self.tokens), list(self.producers), self.stop_reason or "length",
                                dict(self.timings), list(self.audio_chunks))

    def cancel(self) -> None:
        """Stop generating at the next step boundary; the tokens so far stay in the result."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # -- the engine's side -----------------------------------------------------------------------
    def _start(self) -> None:
        self.started = time.perf_counter()
        self.timings["queue_s"] = self.started - self.submitted

    def _push(self, token: int, producer: int) -> bool:
        """Record one new id; returns True when it ends the request (EOS or length)."""
        now = time.perf_counter() - self.started
        self.tokens.append(token)
        self.producers.append(producer)
        self.token_times.append(now)
        if self.timings["ttft_s"] is None:
            self.timings["ttft_s"] = now
        if len(self.tokens) == self._first_chunk_tokens:
            self.timings["first_chunk_s"] = now
        for event in self._chunker.push(token, producer):
            self._emit(event, now)
        if token in self._eos and not self.params.ignore_eos:
            self.stop_reason = "eos"
            return True
        if len(self.tokens) >= self.params.max_new_tokens:
            self.stop_reason = "length"
            return True
        return False

    def _emit(self, event: Token | AudioChunk, now: float) -> None:
        if isinstance(event, AudioChunk):
            self.audio_chunks.append(event)
            if event.complete and self.timings["first_audio_chunk_s"] is None:
                self.timings["first_audio_chunk_s"] = now
        self._events.put(event)

    def _finish(self, stop_reason: str | None = None, error: BaseException | None = None) -> None:
        """Flush an open audio segment, set the timings, wake every waiter. Idempotent."""
        if self._done.is_set():
            return
        if stop_reason is not None:
            self.stop_reason = stop_reason
        self.error = error
        started = self.started if self.started is not None else time.perf_counter()
        total = time.perf_counter() - started
        for chunk in self._chunker.finish():
            self._emit(chunk, total)
        self.timings["total_s"] = total
        self.timings["tokens_per_s"] = len(self.tokens) / total if total > 0 else None
        ttft = self.timings["ttft_s"]
        if len(self.tokens) > 1 and ttft is not None:
            self.timings["decode_tokens_per_s"] = (len(self.tokens) - 1) / max(total - ttft, 1e-9)
        self._events.put(_DONE)
        self._done.set()


class Request:
    """One generation, as returned by `Engine.submit`: iterate it for Token / AudioChunk events
    as they are produced (from any thread, once), `result()` for the GenerationResult,
    `cancel()` to stop it at the next step boundary. A request dropped by its caller before it
    finished (no reference left to it or to its event iterator) is cancelled the same way, so
    an abandoned request never holds a slot."""

    def __init__(self, state: RequestState):
        self._state = state

    @property
    def id(self) -> int:
        return self._state.id

    @property
    def params(self) -> RequestParams:
        return self._state.params

    @property
    def done(self) -> bool:
        return self._state.done

    @property
    def cancelled(self) -> bool:
        return self._state.cancelled

    @property
    def timings(self) -> dict[str, float | None]:
        return dict(self._state.timings)

    @property
    def token_times(self) -> list[float]:
        """Seconds from the request's start (its slot) to the host read of each new id."""
        return list(self._state.token_times)

    def __iter__(self) -> Iterator[Token | AudioChunk]:
        yield from self._state  # the generator keeps this handle (and so the request) alive

    def result(self, timeout: float | None = None) -> GenerationResult:
        return self._state.result(timeout)

    def cancel(self) -> None:
        self._state.cancel()

    def __del__(self) -> None:
        if not self._state.done:
            self._state.cancel()

    def __repr__(self) -> str:
        status = "done" if self.done else "cancelled" if self.cancelled else "running"
        return f"Request(id={self.id}, {status}, {len(self._state.tokens)} tokens)"
