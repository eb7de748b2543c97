"""Model configuration, special token ids and generation defaults, read from a checkpoint."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint directory is missing, inconsistent or corrupt; the message names what."""


@dataclass(frozen=True)
class VitaConfig:
    """The geometry of a VITA-Audio model: an L-layer Qwen2 LLM plus N one-layer MCTP modules."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_llm_layers: int  # L
    num_mtp_modules: int  # N
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_llm_layers", "num_mtp_modules",
                     "num_attention_heads", "num_key_value_heads"):
            if getattr(self, name) < 1:
                raise CheckpointError(f"config {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"config hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"config num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_layers_total(self) -> int:
        return self.num_llm_layers + self.num_mtp_modules

    @classmethod
    def from_hf_dict(cls, d: dict) -> "VitaConfig":
        """Parse a VITA-Audio `config.json` (model_type "qwen2_mtp", num_hidden_layers = L + N)."""
        if d.get("model_type") != "qwen2_mtp":
            raise CheckpointError(
                f"config.json model_type is {d.get('model_type')!r}, expected 'qwen2_mtp' (a VITA-Audio checkpoint)")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_nextn_predict_layers", "num_attention_heads"):
            if key not in d:
                raise CheckpointError(f"config.json lacks the key {key!r}")
        total, n = int(d["num_hidden_layers"]), int(d["num_nextn_predict_layers"])
        if n < 1 or total - n < 1:
            raise CheckpointError(
                f"config.json num_hidden_layers={total} and num_nextn_predict_layers={n} are inconsistent: "
                "expected num_hidden_layers = L + N with L >= 1 LLM layers and N >= 1 MCTP modules")
        if d.get("tie_word_embeddings"):
            raise CheckpointError("config.json tie_word_embeddings is true; VITA-Audio's lm_head is not tied")
        theta = d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 1e6))
        return cls(
            vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]), num_llm_layers=total - n, num_mtp_modules=n,
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d.get("num_key_value_heads", d["num_attention_heads"])),
            rope_theta=float(theta), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            torch_dtype=str(d.get("torch_dtype", d.get("dtype", "bfloat16"))),
        )

    def to_hf_dict(self) -> dict:
        return {
            "model_type": "qwen2_mtp", "architectures": ["Qwen2MTPForCausalLM"],
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers_total, "num_nextn_predict_layers": self.num_mtp_modules,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu", "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings, "tie_word_embeddings": False,
            "torch_dtype": self.torch_dtype,
        }


@dataclass(frozen=True)
class SpecialTokens:
    """Ids that give tokens meaning: end of sequence, and the audio segment markers and codes.

    Audio fields are None for a checkpoint that carries no tokenizer files; generation still
    works, only audio-chunk detection needs them (and says so).
    """

    eos_ids: tuple[int, ...]
    begin_of_audio: int | None = None
    end_of_audio: int | None = None
    audio_offset: int | None = None  # id of <|audio_0|>; ids >= this are audio codes

    @property
    def has_audio(self) -> bool:
        return None not in (self.begin_of_audio, self.end_of_audio, self.audio_offset)

    def is_audio(self, token_id: int) -> bool:
        return self.audio_offset is not None and token_id >= self.audio_offset


@dataclass(frozen=True)
class GenerationDefaults:
    """generation_config.json: EOS ids, the MCTP inference mode and the sampling defaults."""

    eos_token_id: tuple[int, ...] = ()
    mtp_inference_mode: tuple[int, ...] = (1, 10, 4, 10)
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_hf_dict(cls, d: dict) -> "GenerationDefaults":
        eos = d.get("eos_token_id", ())
        eos = (eos,) if isinstance(eos, int) else tuple(int(e) for e in eos or ())
        mode = tuple(int(m) for m in d.get("mtp_inference_mode", cls.mtp_inference_mode))
        return cls(eos_token_id=eos, mtp_inference_mode=mode, do_sample=bool(d.get("do_sample", False)),
                   temperature=float(d.get("temperature", 1.0) or 1.0), top_k=int(d.get("top_k", 0) or 0),
                   top_p=float(d.get("top_p", 1.0) or 1.0),
                   repetition_penalty=float(d.get("repetition_penalty", 1.0) or 1.0))

    def to_hf_dict(self) -> dict:
        d = asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        d["mtp_inference_mode"] = list(self.mtp_inference_mode)
        return d


def read_special_tokens(path: Path, config_dict: dict, defaults: GenerationDefaults) -> SpecialTokens:
    """Special ids from the checkpoint's tokenizer files, never from constants.

    Looks in added_tokens.json (text -> id), then tokenizer_config.json's added_tokens_decoder
    (id -> {content}), then config.json's speech_token_offset for <|audio_0|>.
    """
    names: dict[str, int] = {}
    added = path / "added_tokens.json"
    if added.exists():
        names.update({k: int(v) for k, v in json.loads(added.read_text()).items()})
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.exists():
        for tid, entry in (json.loads(tok_cfg.read_text()).get("added_tokens_decoder") or {}).items():
            names.setdefault(entry.get("content", ""), int(tid))
    offset = names.get("<|audio_0|>", config_dict.get("speech_token_offset"))
    eos = defaults.eos_token_id or tuple(names[t] for t in ("<|im_end|>", "<|endoftext|>") if t in names)
    return SpecialTokens(eos_ids=tuple(eos), begin_of_audio=names.get("<|begin_of_audio|>"),
                         end_of_audio=names.get("<|end_of_audio|>"),
                         audio_offset=None if offset is None else int(offset))


@dataclass(frozen=True)
class Preset:
    """A built-in random-weight model: geometry plus a token layout like the 7B tokenizer's."""

    name: str
    config: VitaConfig
    specials: dict[str, int]  # token text -> id for <|endoftext|>, <|im_end|>, audio markers
    audio_offset: int  # id of <|audio_0|>
    num_audio_codes: int
    default_max_seq_len: int

    def token_names(self) -> dict[str, int]:
        """Token text -> id, as a saved tokenizer's added_tokens.json holds them."""
        names = dict(self.specials)
        names.update({f"<|audio_{c}|>": self.audio_offset + c for c in range(self.num_audio_codes)})
        return names

    def special_tokens(self) -> SpecialTokens:
        s = self.specials
        return SpecialTokens(eos_ids=(s["<|im_end|>"], s["<|endoftext|>"]), begin_of_audio=s["<|begin_of_audio|>"],
                             end_of_audio=s["<|end_of_audio|>"], audio_offset=self.audio_offset)

    @property
    def defaults(self) -> GenerationDefaults:
        return GenerationDefaults(eos_token_id=self.special_tokens().eos_ids)


def _layout(text: int) -> dict[str, int]:
    """The 7B tokenizer's special ids relative to its first special id (151643)."""
    return {"<|endoftext|>": text, "<|im_start|>": text + 1, "<|im_end|>": text + 2,
            "<|begin_of_audio|>": text + 31, "<|end_of_audio|>": text + 32}


def _preset(name, *, text, audio, hidden, inter, layers, heads, kv_heads, max_seq_len, dtype, pad=3):
    offset = text + 42  # <|audio_0|> sits 42 ids after <|endoftext|> in the 7B tokenizer
    cfg = VitaConfig(vocab_size=offset + audio + pad, hidden_size=hidden, intermediate_size=inter,
                     num_llm_layers=layers, num_mtp_modules=10, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, torch_dtype=dtype)
    return Preset(name, cfg, _layout(text), offset, audio, max_seq_len)


PRESETS: dict[str, Preset] = {
    # CPU tests: every shape small and odd-sized, GQA 4:2, 10 MCTP modules as in the release. 268 text ids:
    # the 256 bytes of its byte-level tokenizer plus 12 merges (a size at which the seeded-weight cases
    # of tests/test_engine.py, e.g. an EOS from module 1 mid-burst, still hold).
    "tiny": _preset("tiny", text=268, audio=64, hidden=64, inter=136, layers=2, heads=4, kv_heads=2,
                    max_seq_len=192, dtype="float32"),
    # CPU demo with the 7B's proportions: 28 + 10 layers, GQA 7:1, MLP 5.3x, head ~2.5 layers
    # (fewer audio codes than the 7B's 16384 keep the head in proportion at this width).
    "small": _preset("small", text=4100, audio=6144, hidden=224, inter=1184, layers=28, heads=14, kv_heads=2,
                     max_seq_len=512, dtype="float32"),
    # The released geometry and token ids (V = 168072), initialised directly on the target device.
    "7b": _preset("7b", text=151643, audio=16384, hidden=3584, inter=18944, layers=28, heads=28, kv_heads=4,
                  max_seq_len=4096, dtype="bfloat16"),
}
