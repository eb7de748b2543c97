"""TEST DOUBLE of the engine's serving interface (tests only, never part of the package): a
model-free engine that replays scripted events, for checking how the server turns events
(audio chunks included, which random-weight presets rarely produce) into SSE/WebSocket
messages, timings, cancellations and shutdowns."""
from __future__ import annotations

import queue
import threading

from vita_audio_runtime.request import AudioChunk, GenerationResult

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
