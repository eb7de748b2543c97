"""The generation engine: checkpoint or preset in, tokens, producers, audio chunks and timings out."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from vita_audio_runtime.checkpoint import check_tensors, expected_tensor_shapes, load_checkpoint, random_tensors
from vita_audio_runtime.config import PRESETS, GenerationDefaults, SpecialTokens, VitaConfig
from vita_audio_runtime.model import VitaModel
from vita_audio_runtime.runner import DecodeRunner
from vita_audio_runtime.schedule import LLM, Mode, steps
from vita_kernels.backend import resolve_backend
from vita_kernels.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def producer_name(producer: int) -> str:
    return "llm" if producer == LLM else f"mtp{producer}"


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
    """Turns a token stream into Token and AudioChunk events as soon as each is decidable."""

    def __init__(self, special: SpecialTokens):
        if not special.has_audio:
            raise ValueError("this checkpoint names no audio tokens (added_tokens.json / tokenizer_config.json / "
                             "config.json speech_token_offset): audio-chunk detection needs them")
        self.special = special
        self.codes: list[int] | None = None  # inside a segment when not None
        self.producers: list[int] = []

    def push(self, token: int, producer: int) -> list[Token | AudioChunk]:
        s = self.special
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
    stop_reason: str  # "eos" or "length"
    timings: dict[str, float | None] = field(default_factory=dict)
    audio_chunks: list[AudioChunk] = field(default_factory=list)

    @property
    def producer_names(self) -> list[str]:
        return [producer_name(p) for p in self.producers]


class Engine:
    """A loaded model, its kernels and its decode runner; `generate` and `stream` run the modes.

    Build with `Engine.from_pretrained(path_or_preset, device=..., dtype=..., backend=...)`.
    """

    def __init__(self, cfg: VitaConfig, tensors: dict[str, torch.Tensor], special: SpecialTokens,
                 defaults: GenerationDefaults, backend: str = "auto", max_seq_len: int = 4096,
                 cuda_graphs: bool | None = None):
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
        self.cfg, self.special, self.defaults = cfg, special, defaults
        self.max_seq_len = max_seq_len
        self.kernels = resolve_backend(backend, device, embed.dtype)
        self.model = VitaModel(cfg, tensors, self.kernels, max_seq_len)
        use_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if use_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, got {device}")
        self.runner = DecodeRunner(self.model, max_seq_len, use_graphs)

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, backend: str = "auto",
                        max_seq_len: int | None = None, cuda_graphs: bool | None = None,
                        seed: int = 0) -> "Engine":
        """A checkpoint directory, or a built-in random-weight preset: "tiny", "small" or "7b"."""
        device = resolve_device(device)
        if str(model) in PRESETS:
            preset = PRESETS[str(model)]
            dt = resolve_dtype(dtype or preset.config.torch_dtype, device)
            seq_len = preset.default_max_seq_len if max_seq_len is None else max_seq_len
            _check_weights_fit(preset.name, preset.config, dt, device, seq_len)
            tensors = random_tensors(preset.config, dt, device, seed)
            return cls(preset.config, tensors, preset.special_tokens(), preset.defaults, backend, seq_len,
                       cuda_graphs)
        if not Path(model).is_dir():
            raise ValueError(f"--model {model!r} is neither a checkpoint directory nor a preset "
                             f"({', '.join(PRESETS)})")
        dt = resolve_dtype(dtype, device) if dtype is not None else None
        ckpt = load_checkpoint(model, device, dt)
        return cls(ckpt.config, ckpt.tensors, ckpt.special, ckpt.defaults, backend,
                   4096 if max_seq_len is None else max_seq_len, cuda_graphs)

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
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("prompt_ids is empty: generation needs at least one prompt token")
        v = self.cfg.vocab_size
        for i, t in enumerate(prompt):
            if not isinstance(t, int) or isinstance(t, bool):
                raise ValueError(f"prompt_ids[{i}] = {t!r} is not an integer id")
            if not 0 <= t < v:
                raise ValueError(f"prompt_ids[{i}] = {t} is outside the vocabulary [0, {v})")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(prompt) + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) = "
                             f"{len(prompt) + max_new_tokens} exceeds the KV cache's max_seq_len {self.max_seq_len}")
        return prompt

    # -- the decode loop -------------------------------------------------------------------------
    def _run(self, prompt: list[int], mode, max_new_tokens: int, params: SamplingParams, seed: int,
             ignore_eos: bool) -> Iterator[tuple[int, int]]:
        """Yield (token, producer) as the host reads them: one read per LLM step or MCTP burst."""
        counts = Mode.parse(mode)
        n = self.cfg.num_mtp_modules
        runner = self.runner
        runner.reset(prompt, seed)
        total = len(prompt)  # tokens so far; the LLM has consumed `llm_rows` of them
        llm_rows, module_rows = 0, [0] * n  # rows each module has processed
        eos = set(self.special.eos_ids)
        for step in steps(counts, n, max_new_tokens):
            if step.is_llm:  # chunked prefill over every token it has not seen
                runner.llm_step(llm_rows, total - llm_rows, params)
                llm_rows, made = total, [LLM]
            else:  # module k over every row it has not seen (catch-up included), k = 0..B-1
                runner.burst([(module_rows[k], llm_rows - module_rows[k]) for k in range(step.modules)], params)
                module_rows[:step.modules] = [llm_rows] * step.modules
                made = list(range(step.modules))
            for token, producer in zip(runner.read_tokens(total, len(made)), made):
                yield token, producer
                if token in eos and not ignore_eos:
                    return  # an EOS inside a burst truncates exactly there
            total += len(made)

    def generate(self, prompt_ids: Sequence[int], mode=None, max_new_tokens: int = 64, do_sample=None,
                 temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed: int = 0,
                 ignore_eos: bool = False) -> GenerationResult:
        """Generate up to max_new_tokens new ids in the given mode (a name, Mode or list; None: the
        checkpoint's generation_config mtp_inference_mode)."""
        params = self.sampling_params(do_sample, temperature, top_k, top_p, repetition_penalty)
        mode = self.mode(mode)
        prompt = self._validate(prompt_ids, max_new_tokens)
        chunker = AudioChunker(self.special) if self.special.has_audio else None
        tokens, producers, chunks = [], [], []
        first_chunk_tokens = 1 + self.cfg.num_mtp_modules
        timings: dict[str, float | None] = {"ttft_s": None, "first_chunk_s": None, "first_audio_chunk_s": None}
        stop = "length"
        start = time.perf_counter()
        for token, producer in self._run(prompt, mode, max_new_tokens, params, seed, ignore_eos):
            now = time.perf_counter() - start
            tokens.append(token)
            producers.append(producer)
            if timings["ttft_s"] is None:
                timings["ttft_s"] = now
            if len(tokens) == first_chunk_tokens:
                timings["first_chunk_s"] = now
            if chunker is not None:
                for event in chunker.push(token, producer):
                    if isinstance(event, AudioChunk):
                        chunks.append(event)
                        if timings["first_audio_chunk_s"] is None:
                            timings["first_audio_chunk_s"] = now
            if token in self.special.eos_ids and not ignore_eos:
                stop = "eos"
        total = time.perf_counter() - start
        if chunker is not None:
            chunks += chunker.finish()
        timings["total_s"] = total
        timings["tokens_per_s"] = len(tokens) / total
        if len(tokens) > 1 and timings["ttft_s"] is not None:
            timings["decode_tokens_per_s"] = (len(tokens) - 1) / max(total - timings["ttft_s"], 1e-9)
        return GenerationResult(tokens, producers, stop, timings, chunks)

    def stream(self, prompt_ids: Sequence[int], mode=None, max_new_tokens: int = 64, do_sample=None,
               temperature=None, top_k=None, top_p=None, repetition_penalty=None, seed: int = 0,
               ignore_eos: bool = False) -> Iterator[Token | AudioChunk]:
        """Yield Token events and AudioChunk events (codes = id - audio offset) as soon as each
        segment's end marker is produced, for servers that feed an audio decoder."""
        params = self.sampling_params(do_sample, temperature, top_k, top_p, repetition_penalty)
        mode = self.mode(mode)
        prompt = self._validate(prompt_ids, max_new_tokens)
        chunker = AudioChunker(self.special)
        for token, producer in self._run(prompt, mode, max_new_tokens, params, seed, ignore_eos):
            yield from chunker.push(token, producer)
        yield from chunker.finish()

    def memory_report(self) -> dict[str, int]:
        return self.runner.memory_report()


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


def _check_weights_fit(name: str, cfg: VitaConfig, dtype: torch.dtype, device: torch.device, max_seq_len: int) -> None:
    """A preset's weights, its KV cache and the largest transient (one tensor drawn in fp32, one
    layer's gate/up concatenation) must fit the device's free memory."""
    size = torch.finfo(dtype).bits // 8
    shapes = expected_tensor_shapes(cfg).values()
    weights = sum(math.prod(s) for s in shapes) * size
    kv_cache = 2 * cfg.num_layers_total * cfg.num_key_value_heads * max_seq_len * cfg.head_dim * size
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
