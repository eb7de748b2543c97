"""TEST DOUBLE of the batching engine's serving interface; tests and the server benchmark's smoke
run only, never part of the package.

It offers what the server uses of the continuous-batching `Engine` (`from_pretrained(...,
max_batch, max_queue)`, `submit(...) -> Request`, iterating a request, `result`, `cancel`,
`max_batch`, `max_queue`, `cfg`, `special`, `max_seq_len`, `close`) on top of today's
single-sequence `Engine.stream`: `max_batch` engines share the same weights, one worker thread
each, fed from a bounded queue. Each request runs alone on its engine, so its tokens equal a
solo `Engine.generate` with the same arguments. When the batching engine lands, the tests swap
`ENGINE_FACTORY` for `Engine.from_pretrained`.
"""
from __future__ import annotations

import queue
import threading
import time

from vita_audio_runtime.checkpoint import random_tensors
from vita_audio_runtime.config import PRESETS
from vita_audio_runtime.engine import AudioChunk, Engine, GenerationResult, Token, resolve_device, resolve_dtype
from vita_audio_runtime.server import QueueFullError

_END = object()


class RequestDouble:
    """One submitted request: a blocking, thread-safe event iterator, `result` and `cancel`."""

    def __init__(self, prompt_ids: list[int], kwargs: dict):
        self.prompt_ids, self.kwargs = prompt_ids, kwargs
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self.cancelled = threading.Event()

    def __iter__(self):
        while True:
            event = self._events.get()
            if event is _END:
                return
            yield event

    def cancel(self) -> None:
        self.cancelled.set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request not finished after {timeout} s")
        return self._result


class EngineDouble:
    def __init__(self, engines: list[Engine], max_queue: int):
        self.engines = engines
        first = engines[0]
        self.cfg, self.special, self.max_seq_len = first.cfg, first.special, first.max_seq_len
        self.max_batch, self.max_queue = len(engines), max_queue
        self._pending: queue.Queue = queue.Queue()
        self._waiting = 0  # submitted, not yet picked up by a worker
        self._lock = threading.Lock()
        self.finished: list[RequestDouble] = []  # in finishing order, for tests to inspect
        self._workers = [threading.Thread(target=self._work, args=(e,), daemon=True) for e in engines]
        for w in self._workers:
            w.start()

    @classmethod
    def from_pretrained(cls, model: str, device=None, dtype=None, backend: str = "auto", max_seq_len=None,
                        max_batch: int = 8, max_queue: int = 64) -> "EngineDouble":
        preset = PRESETS[model]  # presets only: a test double
        dev = resolve_device(device)
        dt = resolve_dtype(dtype or preset.config.torch_dtype, dev)
        tensors = random_tensors(preset.config, dt, dev, seed=0)  # the weights Engine.from_pretrained draws
        seq_len = preset.default_max_seq_len if max_seq_len is None else max_seq_len
        engines = [Engine(preset.config, dict(tensors), preset.special_tokens(), preset.defaults, backend, seq_len)
                   for _ in range(max_batch)]
        return cls(engines, max_queue)

    def submit(self, prompt_ids, mode=None, max_new_tokens=64, do_sample=None, temperature=None, top_k=None,
               top_p=None, repetition_penalty=None, seed=0, ignore_eos=False) -> RequestDouble:
        engine = self.engines[0]
        engine.sampling_params(do_sample, temperature, top_k, top_p, repetition_penalty)
        engine.mode(mode)
        prompt = engine._validate(prompt_ids, max_new_tokens)  # ValueError naming the argument
        kwargs = dict(mode=mode, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                      top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                      ignore_eos=ignore_eos)
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFullError(f"{self._waiting} requests waiting, max_queue {self.max_queue}")
            self._waiting += 1
        request = RequestDouble(prompt, kwargs)
        self._pending.put(request)
        return request

    def close(self) -> None:
        for _ in self._workers:
            self._pending.put(None)

    def _work(self, engine: Engine) -> None:
        while True:
            request = self._pending.get()
            if request is None:
                return
            with self._lock:
                self._waiting -= 1
            self._run(engine, request)

    def _run(self, engine: Engine, request: RequestDouble) -> None:
        s = self.special
        tokens, producers, chunks = [], [], []
        timings = {"ttft_s": None, "first_audio_chunk_s": None}
        stop = "cancelled" if request.cancelled.is_set() else "length"
        start = time.perf_counter()
        if stop != "cancelled":
            for event in engine.stream(request.prompt_ids, **request.kwargs):
                if isinstance(event, Token):
                    tokens.append(event.id)
                else:  # the segment's ids again: begin marker, codes, end marker when complete
                    ids = [s.begin_of_audio] + [c + s.audio_offset for c in event.codes]
                    tokens += ids + ([s.end_of_audio] if event.complete else [])
                    chunks.append(event)
                    if timings["first_audio_chunk_s"] is None and event.complete:
                        timings["first_audio_chunk_s"] = time.perf_counter() - start
                producers += [event.producer] if isinstance(event, Token) else event.producers
                if timings["ttft_s"] is None:
                    timings["ttft_s"] = time.perf_counter() - start
                request._events.put(event)
                if request.cancelled.is_set():
                    stop = "cancelled"
                    break
            else:
                if tokens and tokens[-1] in s.eos_ids and not request.kwargs["ignore_eos"]:
                    stop = "eos"
        total = time.perf_counter() - start
        timings.update(total_s=total, tokens_per_s=len(tokens) / max(total, 1e-9))
        request._result = GenerationResult(tokens, producers, stop, timings, chunks)
        with self._lock:
            self.finished.append(request)
        request._done.set()
        request._events.put(_END)


class ScriptedEngine:
    """A model-free double: every submit replays `events` (Token/AudioChunk) with `delay_s` between
    them; for checking how the server turns events into SSE/WebSocket messages, timings and cancels."""

    def __init__(self, cfg, special, events: list, delay_s: float = 0.0, max_seq_len: int = 4096, max_queue: int = 4):
        self.cfg, self.special, self.max_seq_len = cfg, special, max_seq_len
        self.events, self.delay_s = events, delay_s
        self.max_batch, self.max_queue = 1, max_queue
        self.requests: list[RequestDouble] = []

    def submit(self, prompt_ids, **kwargs) -> RequestDouble:
        request = RequestDouble(list(prompt_ids), kwargs)
        self.requests.append(request)
        threading.Thread(target=self._play, args=(request,), daemon=True).start()
        return request

    def _play(self, request: RequestDouble) -> None:
        s = self.special
        tokens, producers, chunks = [], [], []
        stop = "length"
        for event in self.events:
            if request.cancelled.wait(self.delay_s):
                stop = "cancelled"
                break
            if isinstance(event, AudioChunk):
                tokens += [s.begin_of_audio] + [c + s.audio_offset for c in event.codes] + [s.end_of_audio]
                producers += event.producers
                chunks.append(event)
            else:
                tokens.append(event.id)
                producers.append(event.producer)
            request._events.put(event)
        request._result = GenerationResult(tokens, producers, stop, {"ttft_s": 0.0, "total_s": 0.0}, chunks)
        request._done.set()
        request._events.put(_END)

    def close(self) -> None:
        pass
