"""The generation engine: checkpoint or preset in; tokens, producers, audio chunks and timings out,
for many requests at once.

Every public call is safe from any thread: it validates and queues a Request. Whoever waits on a
request (iterating it, `result()`, `generate`, `stream`, `astream`) drives the decode loop
(`_tick`) for everyone while it waits, one driver at a time; the others wait for its ticks and
take over when it leaves. So a lone caller runs the loop in its own thread (no hand-off per
token, and on a CPU no second OpenMP thread team), and with many callers the batch keeps moving
as long as anyone waits.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Iterator, Sequence

import torch

from vita_audio_runtime.checkpoint import check_tensors, expected_tensor_shapes, load_checkpoint, random_tensors
from vita_audio_runtime.config import PRESETS, GenerationDefaults, SpecialTokens, VitaConfig
from vita_audio_runtime.model import VitaModel
from vita_audio_runtime.request import (AudioChunk, EngineClosedError, GenerationResult, QueueFullError, Request,
                                        RequestParams, RequestState, Token)
from vita_audio_runtime.runner import DecodeRunner
from vita_audio_runtime.scheduler import Scheduler, SlotState
from vita_audio_runtime.schedule import Mode
from vita_kernels.backend import resolve_backend
from vita_kernels.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class Engine:
    """A loaded model, its kernels and `max_batch` decode slots, served by the callers that wait.

    Build with `Engine.from_pretrained(path_or_preset, device=..., dtype=..., backend=...)`.
    `submit` queues a request and returns at once; `generate`, `stream` and `astream` wrap it.
    Requests join the running batch at the next step boundary and leave it on EOS, length or
    cancellation; each gets exactly the tokens it would get alone.
    """

    def __init__(self, cfg: VitaConfig, tensors: dict[str, torch.Tensor], special: SpecialTokens,
                 defaults: GenerationDefaults, backend: str = "auto", max_seq_len: int = 4096,
                 cuda_graphs: bool | None = None, max_batch: int = 8, max_queue: int = 64,
                 prefill_chunk: int = 512):
        """Build from checkpoint-named tensors (validated here), which the model takes out of
        `tensors`; pass `dict(tensors)` to keep your mapping."""
        check_tensors(cfg, tensors)
        embed = tensors["model.embed_tokens.weight"]
        device = embed.device
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        if max_seq_len + cfg.num_mtp_modules + 1 > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len {max_seq_len} + {cfg.num_mtp_modules + 1} MCTP look-ahead positions exceeds "
                             f"the model's max_position_embeddings {cfg.max_position_embeddings}")
        self.scheduler = Scheduler(max_batch, max_queue, cfg.num_mtp_modules, prefill_chunk)
        self.cfg, self.special, self.defaults = cfg, special, defaults
        self.max_seq_len, self.max_batch, self.max_queue = max_seq_len, max_batch, max_queue
        self.kernels = resolve_backend(backend, device, embed.dtype)
        self.model = VitaModel(cfg, tensors, self.kernels, max_seq_len)
        use_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if use_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, got {device}")
        self.runner = DecodeRunner(self.model, max_seq_len, max_batch, use_graphs)
        self._ids = itertools.count()
        self._lock = threading.Condition()  # guards the scheduler's queue; notified after every tick
        self._driver = threading.Lock()  # held by the one thread running ticks
        self._closed: BaseException | None = None

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, backend: str = "auto",
                        max_seq_len: int | None = None, cuda_graphs: bool | None = None,
                        seed: int = 0, max_batch: int = 8, max_queue: int = 64,
                        prefill_chunk: int = 512) -> "Engine":
        """A checkpoint directory, or a built-in random-weight preset: "tiny", "small" or "7b"."""
        device = resolve_device(device)
        options = dict(backend=backend, cuda_graphs=cuda_graphs, max_batch=max_batch, max_queue=max_queue,
                       prefill_chunk=prefill_chunk)
        if str(model) in PRESETS:
            preset = PRESETS[str(model)]
            dt = resolve_dtype(dtype or preset.config.torch_dtype, device)
            seq_len = preset.default_max_seq_len if max_seq_len is None else max_seq_len
            _check_weights_fit(preset.name, preset.config, dt, device, seq_len, max_batch)
            tensors = random_tensors(preset.config, dt, device, seed)
            return cls(preset.config, tensors, preset.special_tokens(), preset.defaults, max_seq_len=seq_len,
                       **options)
        if not Path(model).is_dir():
            raise ValueError(f"--model {model!r} is neither a checkpoint directory nor a preset "
                             f"({', '.join(PRESETS)})")
        dt = resolve_dtype(dtype, device) if dtype is not None else None
        ckpt = load_checkpoint(model, device, dt)
        return cls(ckpt.config, ckpt.tensors, ckpt.special, ckpt.defaults,
                   max_seq_len=4096 if max_seq_len is None else max_seq_len, **options)

    # -- arguments -------------------------------------------------------------------------------
    def sampling_params(self, do_sample=None, temperature=None, top_k=None, top_p=None,
                        repetition_penalty=None) -> SamplingParams:
        """Explicit values win; unset ones come from the checkpoint's generation_config."""
        d = self.defaults

        def pick(value, default):
            return default if value is None else value

        return SamplingParams(do_sample=pick(do_sample, d.do_sample), temperature=pick(temperature, d.temperature),
                              top_k=pick(top_k, d.top_k), top_p=pick(top_p, d.top_p),
                              repetition_penalty=pick(repetition_penalty, d.repetition_penalty))

    def mode(self, mode=None) -> tuple[int, ...]:
        """The mode list to run: the given one, or the checkpoint's mtp_inference_mode."""
        return Mode.parse(self.defaults.mtp_inference_mode if mode is None else mode)

    def _validate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        if isinstance(prompt_ids, (str, bytes)):
            raise ValueError("prompt_ids must be a sequence of integer ids, got a string")
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("prompt_ids is empty: generation needs at least one prompt token")
        v = self.cfg.vocab_size
        for i, t in enumerate(prompt):
            if not isinstance(t, int) or isinstance(t, bool):
                raise ValueError(f"prompt_ids[{i}] = {t!r} is not an integer id")
            if not 0 <= t < v:
                raise ValueError(f"prompt_ids[{i}] = {t} is outside the vocabulary [0, {v})")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if len(prompt) + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) = "
                             f"{len(prompt) + max_new_tokens} exceeds the KV cache's max_seq_len {self.max_seq_len}")
        return prompt

    def request_params(self, prompt_ids: Sequence[int], mode=None, max_new_tokens: int = 64, do_sample=None,
                       temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed: int = 0,
                       ignore_eos: bool = False) -> RequestParams:
        """Validate a request's arguments (ValueError naming the bad one) into RequestParams."""
        sampling = self.sampling_params(do_sample, temperature, top_k, top_p, repetition_penalty)
        counts = self.mode(mode)
        prompt = self._validate(prompt_ids, max_new_tokens)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        return RequestParams(tuple(prompt), counts, max_new_tokens, sampling, seed, bool(ignore_eos))

    # -- the public calls ------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], mode=None, max_new_tokens: int = 64, do_sample=None,
               temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed: int = 0,
               ignore_eos: bool = False) -> Request:
        """Queue a request and return it at once: iterate it for events, `.result()` for the
        GenerationResult, `.cancel()` to stop it. Raises ValueError for bad arguments and
        QueueFullError when every slot is busy and max_queue requests already wait."""
        params = self.request_params(prompt_ids, mode, max_new_tokens, do_sample, temperature, top_k, top_p,
                                     repetition_penalty, seed, ignore_eos)
        state = RequestState(next(self._ids), params, self.special, self.cfg.num_mtp_modules, drive=self._drive)
        with self._lock:
            if self._closed is not None:
                raise EngineClosedError(f"the engine is closed: {self._closed}")
            sched = self.scheduler
            free_slots = self.max_batch - len(sched.running)
            if len(sched.waiting) >= free_slots + self.max_queue:
                raise QueueFullError(f"all {self.max_batch} slots are busy and {len(sched.waiting)} requests wait "
                                     f"(max_queue {self.max_queue}): retry later")
            sched.waiting.append(state)
            self._lock.notify_all()  # a waiting follower may drive it in
        return Request(state)

    def generate(self, prompt_ids: Sequence[int], mode=None, max_new_tokens: int = 64, do_sample=None,
                 temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed: int = 0,
                 ignore_eos: bool = False) -> GenerationResult:
        """Generate up to max_new_tokens new ids in the given mode (a name, Mode or list; None: the
        checkpoint's generation_config mtp_inference_mode)."""
        return self.submit(prompt_ids, mode, max_new_tokens, do_sample, temperature, top_k, top_p,
                           repetition_penalty, seed, ignore_eos).result()

    def stream(self, prompt_ids: Sequence[int], mode=None, max_new_tokens: int = 64, do_sample=None,
               temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed: int = 0,
               ignore_eos: bool = False) -> Iterator[Token | AudioChunk]:
        """Yield Token events and AudioChunk events (codes = id - audio offset) as soon as each
        segment's end marker is produced, for servers that feed an audio decoder. Closing the
        generator early cancels the request."""
        if not self.special.has_audio:
            raise ValueError("this checkpoint names no audio tokens (added_tokens.json / tokenizer_config.json / "
                             "config.json speech_token_offset): audio-chunk detection needs them")
        request = self.submit(prompt_ids, mode, max_new_tokens, do_sample, temperature, top_k, top_p,
                              repetition_penalty, seed, ignore_eos)
        try:
            yield from request
        finally:
            request.cancel()  # a no-op once it has finished

    async def astream(self, prompt_ids: Sequence[int], mode=None, max_new_tokens: int = 64, do_sample=None,
                      temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed: int = 0,
                      ignore_eos: bool = False) -> AsyncIterator[Token | AudioChunk]:
        """`stream` for asyncio: events arrive without blocking the event loop; leaving the loop
        (break, task cancellation) cancels the request."""
        request = self.submit(prompt_ids, mode, max_new_tokens, do_sample, temperature, top_k, top_p,
                              repetition_penalty, seed, ignore_eos)
        events = iter(request)
        loop = asyncio.get_running_loop()
        done = object()
        try:
            while (event := await loop.run_in_executor(None, next, events, done)) is not done:
                yield event
        finally:
            request.cancel()

    def memory_report(self) -> dict[str, int]:
        return self.runner.memory_report()

    def close(self) -> None:
        """Stop serving: unfinished requests end with stop_reason "cancelled"; new ones are refused."""
        with self._lock:
            if self._closed is None:
                self._closed = EngineClosedError("closed by Engine.close()")
            self._lock.notify_all()
        with self._driver:  # any running tick completes first
            self._end_all(None)

    # -- the decode loop -------------------------------------------------------------------------
    def _drive(self, ready, timeout: float | None = None) -> None:
        """Run ticks until `ready()` (or the timeout, or the engine closes), while no other thread
        does; otherwise wait for that thread's ticks, taking over when it leaves."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready() and self._closed is None:
            if deadline is not None and time.monotonic() >= deadline:
                return
            if self._driver.acquire(blocking=False):
                try:
                    while not ready() and self._closed is None:
                        if deadline is not None and time.monotonic() >= deadline:
                            return
                        if not self._step_once():
                            break  # nothing left to run: `ready` was decided by a finish
                finally:
                    self._driver.release()
                    with self._lock:
                        self._lock.notify_all()  # a follower takes over
                continue
            with self._lock:
                self._lock.wait(0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic())))

    def _step_once(self) -> bool:
        """One tick (admitting waiting requests first); False when nothing waits or runs. A failed
        step leaves the device state unknown: every request then ends with that error, and the
        engine refuses new ones."""
        with self._lock:
            if self.scheduler.idle:
                return False
            admitted = self.scheduler.admit()
        try:
            for state in admitted:
                self.runner.reset_slot(state.slot, state.request.params.prompt, state.request.params.seed)
            self._tick()
        except Exception as error:  # noqa: BLE001 - delivered to every request's waiters
            failure = EngineClosedError(f"the engine failed: {error!r}")
            failure.__cause__ = error
            with self._lock:
                self._closed = failure
            self._end_all(failure)
            return False
        with self._lock:
            self._lock.notify_all()
        return True

    def _end_all(self, failure: BaseException | None) -> None:
        sched = self.scheduler
        with self._lock:
            unfinished = list(sched.waiting) + [s.request for s in sched.running.values()]
            sched.waiting.clear()
            sched.running.clear()
        for request in unfinished:
            request._finish("cancelled", failure)

    def _tick(self) -> None:
        """One step boundary to the next: every LLM-stepping slot in one variable-length LLM
        step, then every bursting slot module by module, then one host read of the new tokens."""
        sched, runner = self.scheduler, self.runner
        for state in [s for s in sched.running.values() if s.request.cancelled]:
            self._leave(state, "cancelled")
        llm, burst = sched.plan()
        made: list[tuple[SlotState, int, list[int]]] = []  # (slot, first new index, producers)
        if llm:
            spans = [s.llm_span() for s in llm]
            runner.llm_step(spans, [s.request.params.sampling for s, sp in zip(llm, spans) if sp.emit])
            for state, span in zip(llm, spans):
                start = state.total
                produced = state.advance_llm(span)
                if produced:
                    made.append((state, start, produced))
        for k in range(max((s.step.modules for s in burst), default=0)):
            group = [s for s in burst if s.step.modules > k]
            runner.mtp_step(k, [s.module_span(k) for s in group], [s.request.params.sampling for s in group])
        for state in burst:
            start = state.total
            made.append((state, start, state.advance_burst()))
        if not made:
            return
        reads = runner.read_tokens([(s.slot, start, len(producers)) for s, start, producers in made])
        for (state, _, producers), tokens in zip(made, reads):
            for token, producer in zip(tokens, producers):
                if state.request._push(token, producer):  # EOS (a burst truncates there) or length
                    self._leave(state)
                    break
            else:
                if state.step is None:
                    self._leave(state, "length")

    def _leave(self, state: SlotState, stop_reason: str | None = None) -> None:
        with self._lock:
            self.scheduler.release(state.slot)
        state.request._finish(stop_reason)


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None  # unknown here: let the allocator speak


def _check_weights_fit(name: str, cfg: VitaConfig, dtype: torch.dtype, device: torch.device, max_seq_len: int,
                       max_batch: int) -> None:
    """A preset's weights, its KV cache (one region per slot, plus the scratch region) and the
    largest transient (one tensor drawn in fp32, one layer's gate/up concatenation) must fit the
    device's free memory."""
    size = torch.finfo(dtype).bits // 8
    shapes = expected_tensor_shapes(cfg).values()
    weights = sum(math.prod(s) for s in shapes) * size
    regions = (max_batch + 1) * max_seq_len
    kv_cache = 2 * cfg.num_layers_total * cfg.num_key_value_heads * regions * cfg.head_dim * size
    kv_cache += cfg.num_mtp_modules * regions * cfg.hidden_size * size  # the hidden history
    transient = max(4 * max(math.prod(s) for s in shapes), 2 * cfg.intermediate_size * cfg.hidden_size * size)
    needed = weights + kv_cache + transient
    available = _available_bytes(device)
    if available is not None and needed > available:
        raise ValueError(f"preset {name!r} needs {needed / 1e9:.1f} GB ({str(dtype).removeprefix('torch.')} weights "
                         f"and KV cache) but {device} has {available / 1e9:.1f} GB free; use a device with more "
                         "memory or a smaller preset (tiny, small)")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a valid torch device (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but no CUDA device is available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported: expected cpu or cuda")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported: expected float32, bfloat16 or float16")
        return dtype
    if str(dtype) not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: expected one of fp32, bf16, fp16")
    return DTYPES[str(dtype)]
