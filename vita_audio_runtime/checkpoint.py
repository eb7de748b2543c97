"""VITA-Audio checkpoints in the Hugging Face layout: read, validate, and write random ones.

A checkpoint directory holds config.json, generation_config.json, the weights as one
model.safetensors or as shards listed by model.safetensors.index.json, and optionally the
tokenizer files that name the special ids. Only safetensors is read: never pickle.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vita_audio_runtime.config import (
    CheckpointError,
    GenerationDefaults,
    Preset,
    SpecialTokens,
    VitaConfig,
    read_special_tokens,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def layer_tensor_shapes(cfg: VitaConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """The tensors of one Qwen2 decoder layer (q/k/v with bias, o without)."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv, i = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size
    return {
        f"{prefix}.input_layernorm.weight": (h,),
        f"{prefix}.self_attn.q_proj.weight": (q, h), f"{prefix}.self_attn.q_proj.bias": (q,),
        f"{prefix}.self_attn.k_proj.weight": (kv, h), f"{prefix}.self_attn.k_proj.bias": (kv,),
        f"{prefix}.self_attn.v_proj.weight": (kv, h), f"{prefix}.self_attn.v_proj.bias": (kv,),
        f"{prefix}.self_attn.o_proj.weight": (h, q),
        f"{prefix}.post_attention_layernorm.weight": (h,),
        f"{prefix}.mlp.gate_proj.weight": (i, h), f"{prefix}.mlp.up_proj.weight": (i, h),
        f"{prefix}.mlp.down_proj.weight": (h, i),
    }


def expected_tensor_shapes(cfg: VitaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a VITA-Audio checkpoint with its shape (the spec's table)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg.num_layers_total):  # LLM layers 0..L-1, then MCTP layers L..L+N-1
        shapes.update(layer_tensor_shapes(cfg, f"model.layers.{i}"))
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    for k in range(cfg.num_mtp_modules):
        shapes[f"mtp_projs.{k}.weight"] = (h, 2 * h)
        shapes[f"mtp_embed_norms.{k}.weight"] = (h,)
        shapes[f"mtp_hidden_norms.{k}.weight"] = (h,)
    return shapes


def random_tensors(cfg: VitaConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights scaled like a trained model's (unit-scale activations), made on `device`.

    Matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1), biases ~ N(0, 0.1^2), norms ~ 1 + N(0, 0.1^2).
    Drawn in float32 one tensor at a time, so the 7B geometry fits a GPU without a CPU copy.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in expected_tensor_shapes(cfg).items():
        t = torch.empty(shape, dtype=torch.float32, device=device)
        t.normal_(generator=gen)
        if name.endswith("norm.weight") or "_norms." in name:
            t.mul_(0.1).add_(1.0)
        elif name.endswith(".bias"):
            t.mul_(0.1)
        elif name != "model.embed_tokens.weight":
            t.mul_(1.0 / math.sqrt(shape[-1]))
        out[name] = t.to(dtype)
    return out


def save_checkpoint(path: str | Path, cfg: VitaConfig, tensors: dict[str, torch.Tensor],
                    defaults: GenerationDefaults, token_names: dict[str, int] | None = None,
                    shard_bytes: int | None = None, tokenizer=None) -> Path:
    """Write a checkpoint directory in the Hugging Face layout (sharded when shard_bytes is set).

    `tokenizer` (a vita_audio_runtime.tokenizer.TextTokenizer) adds its files (tokenizer.json,
    tokenizer_config.json, ...), so text prompts work on the saved checkpoint."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = cfg.to_hf_dict()
    if token_names and "<|audio_0|>" in token_names:
        config["speech_token_offset"] = token_names["<|audio_0|>"]
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(defaults.to_hf_dict(), indent=2))
    if tokenizer is not None:
        tokenizer.save(path)
    if token_names:
        (path / "added_tokens.json").write_text(json.dumps(token_names, indent=1))
        decoder = {str(i): {"content": t, "special": True} for t, i in token_names.items()
                   if not t.startswith("<|audio_")}
        # Keep the tokenizer's own tokenizer_config.json (transformers 5 leaves added_tokens_decoder out).
        tok_cfg_path = path / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
        tok_cfg.setdefault("added_tokens_decoder", decoder)
        tok_cfg_path.write_text(json.dumps(tok_cfg, indent=1))
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if shard_bytes is None:
        save_file(cpu, str(path / SINGLE_FILE), metadata={"format": "pt"})
        return path
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in cpu.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in cpu.values())
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return path


def write_random_checkpoint(path: str | Path, preset: Preset, seed: int = 0, dtype: torch.dtype | None = None,
                            shard_bytes: int | None = None) -> Path:
    """A random-weight checkpoint of a preset's geometry, with its tokenizer (tests, demos)."""
    from vita_audio_runtime.tokenizer import TextTokenizer  # transformers loads only when a checkpoint is written

    dtype = dtype or getattr(torch, preset.config.torch_dtype)
    tensors = random_tensors(preset.config, dtype, "cpu", seed)
    return save_checkpoint(path, preset.config, tensors, preset.defaults, preset.token_names(), shard_bytes,
                           tokenizer=TextTokenizer.from_pretrained(preset.name))


SUPPORTED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def config_dtype(cfg: VitaConfig) -> torch.dtype:
    """The checkpoint's torch_dtype ("auto" reads as bfloat16, the released weights' dtype)."""
    name = "bfloat16" if cfg.torch_dtype == "auto" else cfg.torch_dtype.removeprefix("torch.")
    if name not in SUPPORTED_DTYPES:
        raise CheckpointError(f"config.json torch_dtype is {cfg.torch_dtype!r}: expected one of "
                              f"{', '.join(SUPPORTED_DTYPES)}")
    return SUPPORTED_DTYPES[name]


def check_tensors(cfg: VitaConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError unless `tensors` are exactly the model's, with the spec's shapes, in
    one supported dtype, on one device."""
    expected = expected_tensor_shapes(cfg)
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"missing tensor {', '.join(missing[:3])}{more}")
    unexpected = sorted(n for n in tensors if n not in expected)
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]} (not part of a VITA-Audio model with "
                              f"L={cfg.num_llm_layers}, N={cfg.num_mtp_modules})")
    first = tensors["model.embed_tokens.weight"]
    if first.dtype not in SUPPORTED_DTYPES.values():
        raise CheckpointError(f"model.embed_tokens.weight has dtype {first.dtype}: expected float32, bfloat16 "
                              "or float16")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{name} has shape {list(t.shape)}, expected {list(shape)}")
        if t.dtype != first.dtype or t.device != first.device:
            raise CheckpointError(f"{name} is {t.dtype} on {t.device}, but model.embed_tokens.weight is "
                                  f"{first.dtype} on {first.device}: every weight must share one dtype and device")


@dataclass
class LoadedCheckpoint:
    config: VitaConfig
    special: SpecialTokens
    defaults: GenerationDefaults
    tensors: dict[str, torch.Tensor]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _weight_files(path: Path) -> dict[str, list[str] | None]:
    """Map each weight file to the names the index assigns it (None: a single unindexed file)."""
    if (path / INDEX_FILE).exists():
        weight_map = _read_json(path / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path / INDEX_FILE} has no weight_map")
        files: dict[str, list[str] | None] = {}
        for name, fname in weight_map.items():
            files.setdefault(fname, []).append(name)
        return files
    if (path / SINGLE_FILE).exists():
        return {SINGLE_FILE: None}
    raise CheckpointError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> LoadedCheckpoint:
    """Read and validate a checkpoint directory; tensors land on `device` in `dtype`.

    Raises CheckpointError naming the file, key or tensor: a missing or unexpected tensor, a
    wrong shape, a wrong model_type, inconsistent L/N, a truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config_dict = _read_json(path / "config.json")
    cfg = VitaConfig.from_hf_dict(config_dict)
    gen_path = path / "generation_config.json"
    defaults = GenerationDefaults.from_hf_dict(_read_json(gen_path) if gen_path.exists() else {})
    special = read_special_tokens(path, config_dict, defaults)
    expected = expected_tensor_shapes(cfg)
    dtype = dtype or config_dtype(cfg)
    tensors: dict[str, torch.Tensor] = {}
    for fname, indexed_names in _weight_files(path).items():
        fpath = path / fname
        if not fpath.exists():
            raise CheckpointError(f"weight file {fpath} listed in {INDEX_FILE} is missing")
        try:
            with safe_open(str(fpath), framework="pt", device="cpu") as f:
                names = list(f.keys())
                if indexed_names is not None and set(indexed_names) - set(names):
                    absent = sorted(set(indexed_names) - set(names))[:3]
                    raise CheckpointError(f"{fpath} lacks tensors the index assigns it: {absent}")
                for name in names:
                    if name not in expected:
                        raise CheckpointError(f"unexpected tensor {name} in {fname} (not part of a "
                                              f"VITA-Audio model with L={cfg.num_llm_layers}, N={cfg.num_mtp_modules})")
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise CheckpointError(f"{name} has shape {list(shape)}, expected {list(expected[name])}")
                    if name in tensors:
                        raise CheckpointError(f"tensor {name} appears in more than one weight file")
                    tensors[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        except SafetensorError as e:
            raise CheckpointError(f"weight file {fpath} is truncated or corrupt: {e}") from None
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"checkpoint {path} is missing tensor {', '.join(missing[:3])}{more}")
    return LoadedCheckpoint(cfg, special, defaults, tensors)
