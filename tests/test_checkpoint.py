"""Checkpoint round trips (single file and sharded) and every loading error, named."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vita_audio_runtime.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    expected_tensor_shapes,
    load_checkpoint,
    random_tensors,
    save_checkpoint,
    write_random_checkpoint,
)
from vita_audio_runtime.config import PRESETS, CheckpointError
from vita_audio_runtime.engine import Engine

PRESET = PRESETS["tiny"]
CFG = PRESET.config


@pytest.fixture
def ckpt(tmp_path):
    return write_random_checkpoint(tmp_path / "single", PRESET, seed=3)


@pytest.fixture
def sharded(tmp_path):
    return write_random_checkpoint(tmp_path / "sharded", PRESET, seed=3, shard_bytes=150_000)


def test_names_and_shapes_follow_the_spec():
    shapes = expected_tensor_shapes(PRESETS["7b"].config)
    assert shapes["model.embed_tokens.weight"] == (168072, 3584)
    assert shapes["model.layers.37.self_attn.k_proj.weight"] == (512, 3584)
    assert shapes["model.layers.37.self_attn.q_proj.bias"] == (3584,)
    assert "model.layers.37.self_attn.o_proj.bias" not in shapes
    assert shapes["mtp_projs.9.weight"] == (3584, 7168)
    assert shapes["mtp_hidden_norms.0.weight"] == (3584,)
    assert "model.layers.38.input_layernorm.weight" not in shapes


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_round_trip_preserves_every_tensor_and_the_special_ids(tmp_path, layout):
    tensors = random_tensors(CFG, torch.float32, seed=5)
    path = save_checkpoint(tmp_path / layout, CFG, tensors, PRESET.defaults, PRESET.token_names(),
                           shard_bytes=100_000 if layout == "sharded" else None)
    assert (path / (INDEX_FILE if layout == "sharded" else SINGLE_FILE)).exists()
    if layout == "sharded":
        assert len(list(path.glob("model-*-of-*.safetensors"))) > 3
    loaded = load_checkpoint(path)
    assert loaded.config == CFG
    assert loaded.special == PRESET.special_tokens()
    assert loaded.defaults.eos_token_id == PRESET.special_tokens().eos_ids
    assert set(loaded.tensors) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(loaded.tensors[name], t), name


def test_sharded_and_single_generate_the_same_tokens(ckpt, sharded):
    a = Engine.from_pretrained(ckpt, device="cpu", backend="torch", max_seq_len=64)
    b = Engine.from_pretrained(sharded, device="cpu", backend="torch", max_seq_len=64)
    prompt = [5, 6, 7, 8]
    assert (a.generate(prompt, mode="boost", max_new_tokens=20, ignore_eos=True).tokens
            == b.generate(prompt, mode="boost", max_new_tokens=20, ignore_eos=True).tokens)


def test_load_casts_to_the_requested_dtype(ckpt):
    assert load_checkpoint(ckpt, dtype=torch.bfloat16).tensors["lm_head.weight"].dtype == torch.bfloat16


def test_special_ids_come_from_tokenizer_config_alone(ckpt):
    (ckpt / "added_tokens.json").unlink()
    loaded = load_checkpoint(ckpt)
    assert loaded.special.begin_of_audio == PRESET.special_tokens().begin_of_audio
    # <|audio_0|> is not in added_tokens_decoder: it comes from config.json speech_token_offset.
    assert loaded.special.audio_offset == PRESET.audio_offset


def test_checkpoint_without_tokenizer_files_generates_but_has_no_audio(ckpt):
    (ckpt / "added_tokens.json").unlink()
    (ckpt / "tokenizer_config.json").unlink()
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["speech_token_offset"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    engine = Engine.from_pretrained(ckpt, device="cpu", backend="torch", max_seq_len=64)
    assert not engine.special.has_audio
    assert len(engine.generate([1, 2], mode="turbo", max_new_tokens=12, ignore_eos=True).tokens) == 12
    with pytest.raises(ValueError, match="audio-chunk detection needs them"):
        next(engine.stream([1, 2], mode="turbo", max_new_tokens=12))


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _rewrite_weights(path, edit):
    tensors = load_file(str(path / SINGLE_FILE))
    edit(tensors)
    save_file(tensors, str(path / SINGLE_FILE))


@pytest.mark.parametrize("case,match", [
    ("missing", r"missing tensor mtp_projs\.3\.weight"),
    ("unexpected", r"unexpected tensor model\.layers\.12\.mlp\.up_proj\.weight"),
    ("shape", r"mtp_projs\.3\.weight has shape \[64, 64\], expected \[64, 128\]"),
    ("model_type", r"model_type is 'qwen2', expected 'qwen2_mtp'"),
    ("inconsistent", r"num_hidden_layers=5 and num_nextn_predict_layers=10 are inconsistent"),
    ("truncated", r"model\.safetensors is truncated or corrupt"),
    ("corrupt", r"model\.safetensors is truncated or corrupt"),
    ("no_weights", r"neither model\.safetensors nor model\.safetensors\.index\.json"),
    ("bad_json", r"config\.json is not valid JSON"),
    ("dtype", r"config\.json torch_dtype is 'int8'"),
    ("no_config", r"config\.json is missing"),
])
def test_loading_errors_name_the_problem(ckpt, case, match):
    if case == "missing":
        _rewrite_weights(ckpt, lambda t: t.pop("mtp_projs.3.weight"))
    elif case == "unexpected":
        _rewrite_weights(ckpt, lambda t: t.update({"model.layers.12.mlp.up_proj.weight": torch.zeros(2, 2)}))
    elif case == "shape":
        _rewrite_weights(ckpt, lambda t: t.update({"mtp_projs.3.weight": torch.zeros(64, 64)}))
    elif case == "model_type":
        _edit_config(ckpt, model_type="qwen2")
    elif case == "inconsistent":
        _edit_config(ckpt, num_hidden_layers=5)
    elif case == "truncated":
        data = (ckpt / SINGLE_FILE).read_bytes()
        (ckpt / SINGLE_FILE).write_bytes(data[: len(data) // 2])
    elif case == "corrupt":
        (ckpt / SINGLE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif case == "no_weights":
        (ckpt / SINGLE_FILE).unlink()
    elif case == "dtype":
        _edit_config(ckpt, torch_dtype="int8")
    elif case == "bad_json":
        (ckpt / "config.json").write_text("{")
    elif case == "no_config":
        (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(ckpt)


def test_sharded_errors_name_the_shard(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    shard = index["weight_map"]["lm_head.weight"]
    (sharded / shard).unlink()
    with pytest.raises(CheckpointError, match=f"weight file .*{shard} listed in {INDEX_FILE} is missing"):
        load_checkpoint(sharded)


def test_index_naming_a_tensor_its_shard_lacks(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert index["weight_map"]["model.embed_tokens.weight"] != index["weight_map"]["lm_head.weight"]
    index["weight_map"]["model.embed_tokens.weight"] = index["weight_map"]["lm_head.weight"]
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lacks tensors the index assigns it"):
        load_checkpoint(sharded)
