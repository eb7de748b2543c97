"""The `vita-audio` command: the README's main job, JSON output, and errors without tracebacks."""
import json
import subprocess
import sys

import pytest

from vita_audio_runtime.cli import main


def test_generate_json_on_the_tiny_preset(capsys):
    assert main(["generate", "--model", "tiny", "--mode", "turbo", "--prompt-len", "8", "--max-new-tokens", "15",
                 "--greedy", "--ignore-eos", "--device", "cpu", "--backend", "torch", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 15 and len(out["producers"]) == 15
    assert out["producers"][:2] == ["llm", "mtp0"] and out["producers"][11] == "llm"
    assert {"ttft_s", "first_chunk_s", "tokens_per_s"} <= set(out["timings"])
    assert out["memory_bytes"]["kv_cache"] > 0


def test_generate_human_output_with_explicit_prompt(capsys):
    assert main(["generate", "--model", "tiny", "--mode", "1,10,4,10", "--prompt-ids", "1,2,3",
                 "--max-new-tokens", "12", "--device", "cpu", "--ignore-eos"]) == 0
    text = capsys.readouterr().out
    assert "[llm]" in text and "[mtp9]" in text and "tokens/s" in text


def test_generate_matches_the_api(capsys):
    from vita_audio_runtime.engine import Engine

    main(["generate", "--model", "tiny", "--mode", "boost", "--prompt-ids", "5,6", "--max-new-tokens", "14",
          "--ignore-eos", "--device", "cpu", "--json"])
    cli_tokens = json.loads(capsys.readouterr().out)["tokens"]
    api = Engine.from_pretrained("tiny", device="cpu").generate([5, 6], mode="boost", max_new_tokens=14,
                                                                 ignore_eos=True)
    assert cli_tokens == api.tokens


@pytest.mark.parametrize("args,message", [
    (["--mode", "warp"], "unknown mode 'warp'"),
    (["--mode", "1,2,3"], "even"),
    (["--prompt-ids", "1,99999"], "outside the vocabulary"),
    (["--max-new-tokens", "500"], "exceeds the KV cache's max_seq_len"),
    (["--dtype", "int4"], "dtype 'int4' is not supported"),
    (["--device", "cuda:7"], "cuda:7"),
    (["--model", "/nonexistent"], "neither a checkpoint directory nor a preset"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--max-seq-len", "0"], "max_seq_len must be >= 2, got 0"),
    (["--greedy", "--temperature", "0.5"], "--greedy cannot be combined with --temperature"),
])
def test_bad_input_prints_a_message_and_exits_non_zero(args, message):
    prompt = [] if "--prompt-ids" in args else ["--prompt-len", "4"]
    cmd = [sys.executable, "-m", "vita_audio_runtime.cli", "generate", "--model", "tiny", "--device", "cpu",
           "--max-new-tokens", "4"] + prompt + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_says_it_needs_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the suite would run")
    assert main(["bench"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def _tokens(capsys, *extra):
    assert main(["generate", "--model", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "12", "--ignore-eos",
                 "--device", "cpu", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_sampling_flags_turn_sampling_on(capsys):
    greedy = _tokens(capsys)["tokens"]
    sampled = _tokens(capsys, "--temperature", "5", "--top-k", "100")["tokens"]
    assert sampled != greedy
    assert _tokens(capsys, "--temperature", "5", "--top-k", "100")["tokens"] == sampled  # same --seed
    assert _tokens(capsys, "--temperature", "5", "--top-k", "100", "--seed", "1")["tokens"] != sampled


def test_seed_does_not_change_the_preset_weights(capsys):
    assert _tokens(capsys, "--seed", "1")["tokens"] == _tokens(capsys, "--seed", "2")["tokens"]
    assert _tokens(capsys, "--weights-seed", "1")["tokens"] != _tokens(capsys, "--weights-seed", "2")["tokens"]


def test_mode_defaults_to_the_checkpoint_generation_config(tmp_path, capsys):
    from vita_audio_runtime.checkpoint import write_random_checkpoint
    from vita_audio_runtime.config import PRESETS

    path = write_random_checkpoint(tmp_path / "ckpt", PRESETS["tiny"])
    gen = json.loads((path / "generation_config.json").read_text())
    gen["mtp_inference_mode"] = [1, 10]
    (path / "generation_config.json").write_text(json.dumps(gen))
    assert main(["generate", "--model", str(path), "--prompt-len", "4", "--max-new-tokens", "14", "--ignore-eos",
                 "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == [1, 10] and out["producers"][11:13] == ["llm", "mtp0"]  # Turbo, not Boost
