"""Serve generation over the network: HTTP (JSON or Server-Sent Events) and WebSocket.

    POST /v1/generate   {prompt | prompt_ids, ...}: one JSON object, or with "stream": true the events
                        `text` (a delta), `audio` (one chunk's codes) and a final `done`
    WS   /v1/stream     the same request as the first message; the same events as JSON messages with a
                        "type" field; {"type": "cancel"} ends the request
    GET  /health, GET /v1/model

The engine batches and queues; this module only validates, tokenizes, submits and relays. Each
request is one `engine.submit(...)`; its events are read in a thread (the request object's
iterator blocks) and handed to the event loop. A request whose client goes away, a WebSocket
cancel and a server shutdown each call `request.cancel()`, which frees the slot at the engine's
next step boundary. Needs the `serve` extra (uvicorn, starlette).
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from vita_audio_runtime.schedule import Mode
from vita_audio_runtime.tokenizer import TextTokenizer

from vita_audio_runtime.request import EngineClosedError, QueueFullError

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a 7B-cache prompt of 32k ids as JSON is ~250 KB
RETRY_AFTER_S = 1

# Field -> (accepted JSON types, description for messages). `prompt`/`prompt_ids` are checked apart.
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "prompt": ((str,), "a string"),
    "prompt_ids": ((list,), "a list of integer ids"),
    "system": ((str,), "a string"),
    "audio": ((list,), "a list of integer audio codes"),
    "mode": ((str, list), "a mode name (vanilla, balance, boost, turbo) or a list like [1, 10, 4, 10]"),
    "max_new_tokens": ((int,), "an integer"),
    "do_sample": ((bool,), "a boolean"),
    "temperature": ((int, float), "a number"),
    "top_k": ((int,), "an integer"),
    "top_p": ((int, float), "a number"),
    "repetition_penalty": ((int, float), "a number"),
    "seed": ((int,), "an integer"),
    "ignore_eos": ((bool,), "a boolean"),
    "stream": ((bool,), "a boolean"),
}


class BadRequest(ValueError):
    """A request the server refuses; `status` is the HTTP status, the message names the field."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class GenerateRequest:
    prompt_ids: list[int]
    engine_kwargs: dict[str, Any]  # exactly the keyword arguments of engine.submit
    stream: bool = False


@dataclass
class _Outcome:
    """What a finished request produced, as the final event and the non-streaming body carry it."""

    tokens: list[int] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    text: str | None = ""
    audio_chunks: list[list[int]] = field(default_factory=list)
    stop_reason: str = ""
    timings: dict[str, float | None] = field(default_factory=dict)
    message: str | None = None


_END = object()


class _Relay:
    """One submitted engine request; a thread drains its blocking iterator into an asyncio queue."""

    def __init__(self, request, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel_reason: str | None = None  # "client" | "disconnected" | "shutdown"
        self.finished = False  # the engine's iterator has ended
        threading.Thread(target=self._drain, name="vita-relay", daemon=True).start()

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop has closed (the server is gone): nobody is listening
            pass

    def _drain(self) -> None:
        try:
            for event in self.request:
                self._put(event)
        except BaseException as e:  # noqa: BLE001 - relayed to the client as an error event
            self._put(e)
        self._put(_END)

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.request.cancel()


class GenerationService:
    """Validation, tokenization and the event stream of each request, shared by HTTP and WebSocket."""

    def __init__(self, engine, tokenizer: TextTokenizer | None, model_name: str = "",
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, tokenizer_error: str | None = None):
        from vita_audio_runtime import AudioChunk  # the engine's event types

        self.engine = engine
        self.tokenizer = tokenizer
        self.tokenizer_error = tokenizer_error or "this checkpoint has no tokenizer files"
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes
        self.shutting_down = False
        self.active: set[_Relay] = set()  # submitted and not yet finished or closed
        self._lock = threading.Lock()  # `active` is also read by a stop request from another thread
        self._audio_chunk_type = AudioChunk

    # -- requests --------------------------------------------------------------------------------
    def parse_body(self, body: bytes) -> GenerateRequest:
        if len(body) > self.max_body_bytes:
            raise BadRequest(f"request body is {len(body)} bytes, more than the limit of {self.max_body_bytes}", 413)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        return self.parse(data)

    def parse(self, data: Any) -> GenerateRequest:
        """Check every field's name, type and range; build the prompt ids and engine.submit's kwargs."""
        if not isinstance(data, dict):
            raise BadRequest(f"request must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}; accepted fields: {', '.join(_FIELDS)}")
        for name, value in data.items():
            types, what = _FIELDS[name]
            is_bool = isinstance(value, bool)
            if value is not None and (not isinstance(value, types) or (is_bool and bool not in types)):
                raise BadRequest(f"field {name!r} must be {what}, got {type(value).__name__} {value!r}"[:300])
        data = {k: v for k, v in data.items() if v is not None}
        if ("prompt" in data) == ("prompt_ids" in data):
            raise BadRequest("exactly one of the fields 'prompt' (text) and 'prompt_ids' must be given")
        cfg = self.engine.cfg
        if "prompt_ids" in data:
            for extra in ("system", "audio"):
                if extra in data:
                    raise BadRequest(f"field {extra!r} goes with a text 'prompt', not with 'prompt_ids'")
            prompt_ids = data["prompt_ids"]
            if not prompt_ids:
                raise BadRequest("field 'prompt_ids' is empty: generation needs at least one prompt id")
            for i, t in enumerate(prompt_ids):
                if not isinstance(t, int) or isinstance(t, bool):
                    raise BadRequest(f"field 'prompt_ids'[{i}] = {t!r} is not an integer id")
                if not 0 <= t < cfg.vocab_size:
                    raise BadRequest(f"field 'prompt_ids'[{i}] = {t} is outside the vocabulary [0, {cfg.vocab_size})")
        else:
            prompt_ids = self._chat_ids(data)
        max_new = data.get("max_new_tokens", 64)
        if max_new < 1:
            raise BadRequest(f"field 'max_new_tokens' must be >= 1, got {max_new}")
        if len(prompt_ids) + max_new > self.engine.max_seq_len:
            raise BadRequest(f"prompt ({len(prompt_ids)} ids) + field 'max_new_tokens' ({max_new}) = "
                             f"{len(prompt_ids) + max_new} exceeds the KV cache's max_seq_len "
                             f"{self.engine.max_seq_len}")
        self._check_sampling(data)
        if not 0 <= data.get("seed", 0) < 2**63:
            raise BadRequest(f"field 'seed' must be in [0, 2**63), got {data['seed']}")
        mode = data.get("mode")
        if mode is not None:
            try:
                mode = Mode.parse(mode) if isinstance(mode, str) else Mode.parse([_int(c, "mode") for c in mode])
            except ValueError as e:
                raise BadRequest(f"field 'mode': {e}") from None
        kwargs = dict(mode=mode, max_new_tokens=max_new, do_sample=data.get("do_sample"),
                      temperature=_float(data.get("temperature")), top_k=data.get("top_k"),
                      top_p=_float(data.get("top_p")), repetition_penalty=_float(data.get("repetition_penalty")),
                      seed=data.get("seed", 0), ignore_eos=data.get("ignore_eos", False))
        return GenerateRequest(prompt_ids, kwargs, data.get("stream", False))

    def _chat_ids(self, data: dict) -> list[int]:
        if self.tokenizer is None:
            raise BadRequest(f"field 'prompt' needs the model's tokenizer: {self.tokenizer_error}; send 'prompt_ids'")
        codes = data.get("audio") or []
        n_codes = self.tokenizer.num_audio_codes
        for i, c in enumerate(codes):
            if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < n_codes:
                raise BadRequest(f"field 'audio'[{i}] = {c!r} is not an audio code in [0, {n_codes})")
        try:
            return self.tokenizer.chat_prompt_ids(data["prompt"], system=data.get("system"), audio_codes=codes)
        except ValueError as e:
            raise BadRequest(f"field 'audio': {e}") from None

    @staticmethod
    def _check_sampling(data: dict) -> None:
        checks = {"temperature": lambda v: v > 0, "top_k": lambda v: v >= 0, "top_p": lambda v: 0 < v <= 1,
                  "repetition_penalty": lambda v: v > 0}
        ranges = {"temperature": "> 0", "top_k": ">= 0 (0: off)", "top_p": "in (0, 1]", "repetition_penalty": "> 0"}
        for name, ok in checks.items():
            if name in data and (not math.isfinite(data[name]) or not ok(data[name])):
                raise BadRequest(f"field {name!r} must be {ranges[name]}, got {data[name]}")

    def submit(self, req: GenerateRequest) -> _Relay:
        """engine.submit, mapped to HTTP: ValueError -> 400, QueueFullError or shutdown -> 503."""
        if self.shutting_down:
            raise BadRequest("the server is shutting down", 503)
        try:
            request = self.engine.submit(req.prompt_ids, **req.engine_kwargs)
        except QueueFullError as e:
            raise BadRequest(f"the engine's queue is full ({self.engine.max_queue} waiting): {e}; retry later",
                             503) from None
        except EngineClosedError as e:
            raise BadRequest(f"the engine is not serving: {e}", 503) from None
        except ValueError as e:
            raise BadRequest(str(e)) from None
        relay = _Relay(request, asyncio.get_running_loop())
        with self._lock:
            self.active.add(relay)
        if self.shutting_down:  # the stop began while this request was being submitted
            relay.cancel("shutdown")
        return relay

    # -- events ----------------------------------------------------------------------------------
    async def events(self, relay: _Relay, started: float, outcome: _Outcome) -> AsyncIterator[dict]:
        """`text`, `audio` and finally `done` (or `error`) events; fills `outcome` as it goes."""
        detok = self.tokenizer.detokenizer() if self.tokenizer is not None else None
        audio_ttfp = None
        try:
            while True:
                event = await relay.events.get()
                if event is _END:
                    relay.finished = True
                    break
                if isinstance(event, BaseException):
                    relay.finished = True
                    outcome.stop_reason, outcome.message = "error", f"generation failed: {event!r}"
                    yield {"type": "error", "message": outcome.message}
                    return
                if isinstance(event, self._audio_chunk_type):
                    if event.complete and audio_ttfp is None:
                        audio_ttfp = time.perf_counter() - started
                    outcome.audio_chunks.append(list(event.codes))
                    yield {"type": "audio", "codes": list(event.codes), "complete": event.complete}
                elif detok is not None:
                    delta = detok.push(event.id)
                    if delta:
                        yield {"type": "text", "text": delta}
            if detok is not None and (tail := detok.flush()):
                yield {"type": "text", "text": tail}
            result = await asyncio.to_thread(relay.request.result, 60.0)
            outcome.tokens, outcome.producers = list(result.tokens), list(result.producer_names)
            outcome.text = self.tokenizer.decode(result.tokens) if self.tokenizer is not None else None
            outcome.stop_reason = result.stop_reason
            if result.stop_reason == "cancelled" and relay.cancel_reason == "shutdown":
                outcome.stop_reason, outcome.message = "shutdown", "the server is shutting down"
            outcome.timings = {**result.timings, "audio_ttfp_s": audio_ttfp,
                               "request_s": time.perf_counter() - started}
            done = {"type": "done", "tokens": outcome.tokens, "producers": outcome.producers,
                    "stop_reason": outcome.stop_reason, "timings": outcome.timings}
            if outcome.message:
                done["message"] = outcome.message
            yield done
        finally:  # also when the consumer stops early (its client left): then the request is cancelled
            self.close(relay, "disconnected")

    def close(self, relay: _Relay, reason: str) -> None:
        """The client is gone or asked to stop: cancel unless the request already finished."""
        with self._lock:
            self.active.discard(relay)
        if not relay.finished:
            relay.cancel(reason)

    def begin_shutdown(self) -> None:
        """Refuse new requests; end the in-flight ones (their streams close with stop_reason "shutdown")."""
        self.shutting_down = True
        with self._lock:
            relays = list(self.active)
        for relay in relays:
            relay.cancel("shutdown")

    def model_info(self) -> dict:
        e, s = self.engine, self.engine.special
        return {"model": self.model_name, "config": asdict(e.cfg),
                "modes": {m.name.lower(): list(m.value) for m in Mode},
                "special": {"eos_ids": list(s.eos_ids), "begin_of_audio": s.begin_of_audio,
                            "end_of_audio": s.end_of_audio, "audio_offset": s.audio_offset},
                "max_batch": e.max_batch, "max_queue": e.max_queue, "max_seq_len": e.max_seq_len,
                "text_prompts": self.tokenizer is not None}


def _int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} entries must be integers, got {value!r}")
    return value


def _float(value):
    return None if value is None else float(value)


def _error(e: BadRequest) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
    return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)


class _EventStreamResponse(StreamingResponse):
    """Server-Sent Events that watch for the client leaving whatever the ASGI version: the
    request is cancelled when the client disconnects, even while no event is due."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away while we were sending
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self.on_close()


def _sse(event: dict) -> str:
    payload = {k: v for k, v in event.items() if k != "type"}
    return f"event: {event['type']}\ndata: {json.dumps(payload)}\n\n"


async def _read_body(request: HttpRequest, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"request body is {declared} bytes, more than the limit of {limit}", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(f"request body is more than the limit of {limit} bytes", 413)
    return bytes(body)


async def _wait_for_disconnect(request: HttpRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(service: GenerationService) -> Starlette:
    async def generate(request: HttpRequest):
        started = time.perf_counter()
        try:
            req = service.parse_body(await _read_body(request, service.max_body_bytes))
            relay = service.submit(req)
        except BadRequest as e:
            return _error(e)
        outcome = _Outcome()
        if req.stream:
            async def body():
                async for event in service.events(relay, started, outcome):
                    yield _sse(event)

            return _EventStreamResponse(body(), on_close=lambda: service.close(relay, "disconnected"))
        # Not streaming: collect, but cancel if the client leaves first.
        async def collect():
            async for _ in service.events(relay, started, outcome):
                pass

        collector = asyncio.ensure_future(collect())
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not collector.done():
            service.close(relay, "disconnected")
        watcher.cancel()
        await collector
        if outcome.stop_reason == "error":
            return JSONResponse({"error": outcome.message}, status_code=500)
        body = {"tokens": outcome.tokens, "producers": outcome.producers, "text": outcome.text,
                "audio_chunks": outcome.audio_chunks, "stop_reason": outcome.stop_reason, "timings": outcome.timings}
        if outcome.message:
            body["message"] = outcome.message
        return JSONResponse(body)

    async def stream(ws: WebSocket):
        await ws.accept()
        started = time.perf_counter()
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        raw = message.get("bytes") or (message.get("text") or "").encode()
        try:
            req = service.parse_body(raw)
            relay = service.submit(req)
        except BadRequest as e:
            await ws.send_json({"type": "error", "status": e.status, "message": str(e)})
            await ws.close(code={503: 1013, 413: 1009}.get(e.status, 1008))
            return

        async def listen() -> None:  # a cancel message or the client leaving ends the request
            while True:
                incoming = await ws.receive()
                if incoming["type"] == "websocket.disconnect":
                    service.close(relay, "disconnected")
                    return
                try:
                    cancel = json.loads(incoming.get("text") or incoming.get("bytes") or b"").get("type") == "cancel"
                except (json.JSONDecodeError, AttributeError):
                    cancel = False
                if cancel:
                    relay.cancel("client")
                else:
                    await ws.send_json({"type": "error", "status": 400,
                                        "message": 'only {"type": "cancel"} is accepted after the request'})

        listener = asyncio.ensure_future(listen())
        try:
            async for event in service.events(relay, started, _Outcome()):
                await ws.send_json(event)
            await ws.close(code=1000)
        except (OSError, RuntimeError, WebSocketDisconnect):  # the client left mid-send
            service.close(relay, "disconnected")
        finally:
            listener.cancel()
            service.close(relay, "disconnected")

    async def health(_request: HttpRequest):
        if service.shutting_down:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok", "active_requests": len(service.active)})

    async def model(_request: HttpRequest):
        return JSONResponse(service.model_info())

    return Starlette(routes=[
        Route("/v1/generate", generate, methods=["POST"]),
        WebSocketRoute("/v1/stream", stream),
        Route("/health", health, methods=["GET"]),
        Route("/v1/model", model, methods=["GET"]),
    ])


class Server(uvicorn.Server):
    """uvicorn with a graceful stop: the first stop signal (or `request_stop()`) ends in-flight
    streams with a final event saying so, waits up to `grace_s` for them to close, then exits."""

    def __init__(self, config: uvicorn.Config, service: GenerationService, grace_s: float = 10.0):
        super().__init__(config)
        self.service = service
        self.grace_s = grace_s

    def handle_exit(self, sig, frame) -> None:
        if self.service.shutting_down:  # a second signal: stop now
            return super().handle_exit(sig, frame)
        self.service.begin_shutdown()
        threading.Thread(target=self._exit_when_drained, args=(sig, frame), daemon=True).start()

    def _exit_when_drained(self, sig, frame) -> None:
        deadline = time.monotonic() + self.grace_s
        while self.service.active and time.monotonic() < deadline:
            time.sleep(0.01)
        super().handle_exit(sig, frame)

    def request_stop(self) -> None:
        import signal

        self.handle_exit(signal.SIGTERM, None)


def build_server(engine, tokenizer: TextTokenizer | None, host: str = "127.0.0.1", port: int = 8000,
                 model_name: str = "", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "info",
                 tokenizer_error: str | None = None) -> Server:
    service = GenerationService(engine, tokenizer, model_name, max_body_bytes, tokenizer_error)
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level, lifespan="off",
                            ws="auto", timeout_graceful_shutdown=5)
    return Server(config, service)
