"""The presets' tokenizers, the chat prompt, incremental detokenizing and tokenizer files in checkpoints."""
import dataclasses
import json
import random

import pytest

from vita_audio_runtime.checkpoint import load_checkpoint, write_random_checkpoint
from vita_audio_runtime.cli import main
from vita_audio_runtime.config import PRESETS
from vita_audio_runtime.tokenizer import (
    TextTokenizer,
    TokenizerMissingError,
    _preset_tokenizer_json,
    preset_token_names,
)

# Characters of 1 to 4 UTF-8 bytes; the tiny tokenizer has no merges for the multi-byte ones, so
# each of them is split across byte-level tokens.
TEXT = "Hello, how are you? héllo naïve 世界 ok 🎵🎶 done."


@pytest.fixture(scope="module")
def tiny():
    return TextTokenizer.from_pretrained("tiny")


@pytest.mark.parametrize("name", ["tiny", "small", "7b"])
def test_preset_tokenizer_puts_every_special_token_at_the_layout_id(name):
    preset = PRESETS[name]
    tok = TextTokenizer.from_pretrained(name)
    assert len(tok) == preset.config.vocab_size
    for token, token_id in preset_token_names(preset).items():
        assert tok.hf.convert_tokens_to_ids(token) == token_id, token
    s = preset.special_tokens()
    assert tok.hf.convert_tokens_to_ids("<|audio_0|>") == s.audio_offset
    assert tok.hf.convert_tokens_to_ids("<|im_start|>") == preset.specials["<|endoftext|>"] + 1
    # Every text id decodes to some text; no id in the special range does.
    assert all(tok.is_text(i) for i in range(preset.specials["<|endoftext|>"]))
    assert not any(tok.is_text(i) for i in range(preset.specials["<|endoftext|>"], preset.config.vocab_size))


def test_preset_tokenizer_is_deterministic():
    assert _preset_tokenizer_json.__wrapped__("small") == _preset_tokenizer_json("small")


def test_chat_prompt_follows_the_chatml_format_with_audio_codes(tiny):
    s = tiny.special
    ids = tiny.chat_prompt_ids("Hi there", system="Answer briefly.", audio_codes=[3, 0, 17])
    assert tiny.hf.decode(ids) == ("<|im_start|>system\nAnswer briefly.<|im_end|>\n"
                                   "<|im_start|>user\nHi there\n<|begin_of_audio|><|audio_3|><|audio_0|><|audio_17|>"
                                   "<|end_of_audio|><|im_end|>\n<|im_start|>assistant\n")
    start = ids.index(s.begin_of_audio)
    assert ids[start:start + 5] == [s.begin_of_audio, s.audio_offset + 3, s.audio_offset, s.audio_offset + 17,
                                    s.end_of_audio]
    opening = tiny.hf.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert ids[-len(opening):] == opening and opening[0] == s.eos_ids[0] - 1  # <|im_start|>
    no_system = tiny.chat_prompt_ids("Hi there")
    assert tiny.hf.decode(no_system) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"


def test_decode_leaves_out_audio_markers_and_special_tokens(tiny):
    s = tiny.special
    text_ids = tiny.hf.encode("Hi", add_special_tokens=False)
    ids = [s.begin_of_audio, s.audio_offset + 5, s.end_of_audio, *text_ids, s.eos_ids[0], s.audio_offset + 63]
    assert tiny.decode(ids) == "Hi"


def test_added_tokens_that_are_not_special_decode_as_text():
    tok = TextTokenizer.from_pretrained("tiny")  # a fresh copy: adding a token changes it
    tok.hf.add_tokens(["<note>"])
    note = tok.hf.convert_tokens_to_ids("<note>")
    plain = TextTokenizer(tok.hf, dataclasses.replace(tok.special, audio_offset=None))  # no audio range here
    assert plain.is_text(note) and plain.decode([note, tok.special.eos_ids[0]]) == "<note>"
    assert not tok.is_text(note)  # in the presets every id past the audio offset counts as audio


def test_incremental_detokenizer_holds_back_split_characters(tiny):
    ids = tiny.hf.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT)  # some characters span several tokens
    detok = tiny.detokenizer()
    deltas = [detok.push(i) for i in ids]
    assert detok.flush() == ""
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert "🎵" in deltas and "世" in deltas  # each arrives whole, after its last byte
    assert deltas.count("") >= len(ids) - len(TEXT)


def test_incremental_detokenizer_matches_decode_on_random_ids(tiny):
    """Any id sequence (text, audio, markers, invalid UTF-8) joins to exactly what decode gives."""
    rng = random.Random(7)
    vocab = PRESETS["tiny"].config.vocab_size
    for _ in range(20):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        detok = tiny.detokenizer()
        joined = "".join(detok.push(i) for i in ids) + detok.flush()
        assert joined == tiny.decode(ids), ids


def test_saved_preset_checkpoint_round_trips_its_tokenizer(tmp_path, tiny):
    path = write_random_checkpoint(tmp_path / "ckpt", PRESETS["tiny"])
    assert (path / "tokenizer.json").exists()
    assert load_checkpoint(path).special == PRESETS["tiny"].special_tokens()
    loaded = TextTokenizer.from_pretrained(path)
    assert loaded.special == tiny.special
    assert loaded.chat_prompt_ids(TEXT, audio_codes=[1, 2]) == tiny.chat_prompt_ids(TEXT, audio_codes=[1, 2])
    ids = list(range(PRESETS["tiny"].config.vocab_size))
    assert loaded.decode(ids) == tiny.decode(ids)


def test_text_prompt_without_tokenizer_files_names_them_and_ids_still_work(tmp_path, capsys):
    path = write_random_checkpoint(tmp_path / "ckpt", PRESETS["tiny"])
    (path / "tokenizer.json").unlink()
    with pytest.raises(TokenizerMissingError, match="tokenizer.json"):
        TextTokenizer.from_pretrained(path)
    assert main(["generate", "--model", str(path), "--prompt", "Hello", "--device", "cpu"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    assert main(["generate", "--model", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--device",
                 "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 3 and out["text"] is None


def test_cli_text_prompt_prints_the_decoded_text(capsys, tiny):
    assert main(["generate", "--model", "tiny", "--prompt", "Hello", "--system", "Be brief.", "--max-new-tokens",
                 "16", "--ignore-eos", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == tiny.chat_prompt_ids("Hello", system="Be brief.")
    assert out["text"] == tiny.decode(out["tokens"])
    assert out["text"]  # random weights still produce some text ids
    assert main(["generate", "--model", "tiny", "--prompt", "Hello", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert "text: '" in capsys.readouterr().out
