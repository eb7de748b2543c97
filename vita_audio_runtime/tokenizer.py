"""Text in, text out: the checkpoint's tokenizer, the chat prompt, and incremental detokenizing.

A checkpoint directory carries its Hugging Face tokenizer (tokenizer.json, or vocab.json +
merges.txt); it is loaded offline with transformers. The built-in presets carry a small real
byte-level BPE built in memory at load time: trained on the short text below (deterministic),
its text range padded to the preset's size, and every id from `<|endoftext|>` to the end of
the vocabulary named, so special ids, audio markers and `<|audio_c|>` sit exactly where
config.py's layout puts them.

A text prompt is one user turn in the ChatML format Qwen2 and VITA-Audio use
(`<|im_start|>{role}\\n{content}<|im_end|>\\n`, then `<|im_start|>assistant\\n` as the
generation prompt), with an optional system turn before it and optional audio codes appended to
the user turn as `\\n<|begin_of_audio|><|audio_c|>...<|end_of_audio|>`. Audio ids, the audio
markers and the other special tokens are never decoded as text.
"""
from __future__ import annotations

import itertools
import json
import string
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Sequence

from vita_audio_runtime.config import PRESETS, CheckpointError, GenerationDefaults, Preset, SpecialTokens, \
    read_special_tokens

# The ChatML turn format (the format itself, which Qwen2 checkpoints and VITA-Audio's inference use):
# one `<|im_start|>role\ncontent<|im_end|>\n` per message, then the assistant's opening.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TOKENIZER_FILES = ("tokenizer.json", "vocab.json + merges.txt")

# The presets' training text: a few plain sentences, enough for a few hundred merges. Changing it
# changes every preset's tokenizer, so it is fixed here.
_TRAINING_TEXT = """\
The speech model listens to a question and answers in text and in sound at the same time.
Each answer starts with a few words, then a short piece of audio, then more words and more audio.
Hello! How are you today? I am well, thank you for asking. What would you like to talk about?
We can talk about the weather, the music you like, a book you read, or the city where you live.
It is sunny and warm this morning, but the radio says that rain will come in the evening.
Numbers are spoken one by one: one, two, three, four, five, six, seven, eight, nine and ten.
A good voice is clear and calm; it speaks at an even pace and pauses at the end of a sentence.
Please say that again a little more slowly, so that everyone in the room can follow along.
"""


class TokenizerMissingError(ValueError):
    """A text prompt was given for a checkpoint that carries no tokenizer files."""


# -- the presets' tokenizers --------------------------------------------------------------------
def _reserved_name(token_id: int) -> str:
    return f"<|reserved_{token_id}|>"


def preset_token_names(preset: Preset) -> dict[str, int]:
    """Every id from `<|endoftext|>` to the end of the vocabulary, named (text -> id): the layout's
    special ids and audio codes, and `<|reserved_N|>` for the ids between them."""
    named = preset.token_names()
    first = named["<|endoftext|>"]
    taken = set(named.values())
    for token_id in range(first, preset.config.vocab_size):
        if token_id not in taken:
            named[_reserved_name(token_id)] = token_id
    return named


def _filler_tokens(count: int, taken: set[str]) -> list[str]:
    """`count` distinct alphanumeric strings not in `taken`, in a fixed order (2 letters, then 3, ...).

    They fill the text ids the small training text cannot reach, so every text id decodes to
    something; no merge produces them, so they never appear when encoding."""
    alphabet = string.ascii_letters + string.digits
    out: list[str] = []
    if count <= 0:
        return out
    for length in itertools.count(2):
        for chars in itertools.product(alphabet, repeat=length):
            token = "".join(chars)
            if token not in taken:
                out.append(token)
                if len(out) == count:
                    return out


@lru_cache(maxsize=None)
def _preset_tokenizer_json(name: str) -> str:
    """The preset's tokenizer as a tokenizers JSON string (built once per process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    preset = PRESETS[name]
    text_size = preset.specials["<|endoftext|>"]  # ids [0, text_size) are ordinary text tokens
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if text_size < len(alphabet):
        raise ValueError(f"preset {name!r} has {text_size} text ids, fewer than the {len(alphabet)} a byte-level "
                         "tokenizer needs")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=min(text_size, 1024), min_frequency=2, initial_alphabet=alphabet,
                                  show_progress=False, special_tokens=[])
    bpe.train_from_iterator(_TRAINING_TEXT.splitlines(), trainer=trainer)
    spec = json.loads(bpe.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for token in _filler_tokens(text_size - len(vocab), set(vocab)):
        vocab[token] = len(vocab)
    assert sorted(vocab.values()) == list(range(text_size))
    spec["decoder"] = json.loads(decoders.ByteLevel().__getstate__())
    spec["added_tokens"] = [
        {"id": token_id, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for token, token_id in sorted(preset_token_names(preset).items(), key=lambda kv: kv[1])]
    return json.dumps(spec)


def preset_hf_tokenizer(name: str):
    """A transformers PreTrainedTokenizerFast for a preset, with the ChatML template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_preset_tokenizer_json(name))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML_TEMPLATE, clean_up_tokenization_spaces=False,
                                   model_max_length=PRESETS[name].default_max_seq_len)


def has_tokenizer_files(path: str | Path) -> bool:
    path = Path(path)
    return (path / "tokenizer.json").exists() or ((path / "vocab.json").exists() and (path / "merges.txt").exists())


# -- the tokenizer the runtime uses ---------------------------------------------------------------
class TextTokenizer:
    """The checkpoint's tokenizer plus its special ids: chat prompts to ids, generated ids to text."""

    def __init__(self, hf_tokenizer, special: SpecialTokens, chat_template: str = CHATML_TEMPLATE):
        self.hf = hf_tokenizer
        self.special = special
        self.chat_template = chat_template
        # Ids that never decode as text: the special tokens (markers, EOS, <|im_start|>, ...). Added tokens
        # that are not special (Qwen2.5's <tool_call>, say) are text; audio ids are excluded by range.
        added = getattr(hf_tokenizer, "added_tokens_decoder", {})
        self._non_text = {int(i) for i, t in added.items() if getattr(t, "special", True)}
        self._non_text.update(special.eos_ids)
        self._non_text.update(i for i in (special.begin_of_audio, special.end_of_audio) if i is not None)
        self._size = len(hf_tokenizer)

    @classmethod
    def from_pretrained(cls, model: str | Path) -> "TextTokenizer":
        """A preset name (tiny, small, 7b) or a checkpoint directory holding tokenizer files.

        Raises TokenizerMissingError naming the directory and the files it lacks."""
        if str(model) in PRESETS:
            return cls(preset_hf_tokenizer(str(model)), PRESETS[str(model)].special_tokens())
        path = Path(model)
        if not path.is_dir():
            raise CheckpointError(f"{str(model)!r} is neither a checkpoint directory nor a preset "
                                  f"({', '.join(PRESETS)})")
        if not has_tokenizer_files(path):
            raise TokenizerMissingError(
                f"checkpoint {path} has no tokenizer files ({' or '.join(TOKENIZER_FILES)}): a text prompt needs "
                "them; pass prompt ids instead")
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        # tokenizer.json is complete on its own; AutoTokenizer would also read config.json, whose
        # model_type (qwen2_mtp) it does not know. vocab.json + merges.txt need the class it names.
        loader = PreTrainedTokenizerFast if (path / "tokenizer.json").exists() else AutoTokenizer
        hf = loader.from_pretrained(str(path), local_files_only=True)
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
        gen_path = path / "generation_config.json"
        defaults = GenerationDefaults.from_hf_dict(json.loads(gen_path.read_text()) if gen_path.exists() else {})
        return cls(hf, read_special_tokens(path, config, defaults))

    def save(self, path: str | Path) -> None:
        """Write the tokenizer files (tokenizer.json, tokenizer_config.json, ...) into `path`."""
        self.hf.save_pretrained(str(path))

    def __len__(self) -> int:
        return self._size

    # -- prompts ---------------------------------------------------------------------------------
    def chat_prompt_ids(self, prompt: str, system: str | None = None,
                        audio_codes: Sequence[int] | None = None) -> list[int]:
        """The ids of a chat prompt: [system turn], the user turn (`prompt`, then the audio codes as
        one audio segment), and the assistant's opening."""
        content = prompt
        if audio_codes:
            content += "\n" + self.audio_segment_text(audio_codes)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        text = self.hf.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                           add_generation_prompt=True)
        return list(self.hf.encode(text, add_special_tokens=False))

    @cached_property
    def num_audio_codes(self) -> int:
        """How many `<|audio_c|>` tokens the tokenizer names (c = 0, 1, ... without a gap)."""
        names = {str(t) for t in getattr(self.hf, "added_tokens_decoder", {}).values()}
        count = 0
        while f"<|audio_{count}|>" in names:
            count += 1
        return count

    def audio_segment_text(self, codes: Sequence[int]) -> str:
        if not self.special.has_audio:
            raise ValueError("this checkpoint names no audio tokens, so audio codes cannot be part of a prompt")
        return "<|begin_of_audio|>" + "".join(f"<|audio_{int(c)}|>" for c in codes) + "<|end_of_audio|>"

    # -- output ----------------------------------------------------------------------------------
    def is_text(self, token_id: int) -> bool:
        """True for an ordinary text id: not audio, not a marker, EOS or other special token."""
        return 0 <= token_id < self._size and not self.special.is_audio(token_id) and token_id not in self._non_text

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, with audio ids and special tokens left out."""
        return self._decode([i for i in ids if self.is_text(i)])

    def _decode(self, text_ids: list[int]) -> str:
        return self.hf.decode(text_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def detokenizer(self) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
    """Turns generated ids into text deltas as they arrive, one id at a time.

    A character split across byte-level tokens is held back until its last byte arrives: a
    delta is emitted only when the decoded text does not end in an incomplete UTF-8 sequence.
    Only a short window is re-decoded per id (the ids since the last emitted boundary), so the
    cost per id stays constant. The deltas joined, plus `flush()`, equal `decode(all ids)`.
    """

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to text already emitted (context for the next delta)
        self._read = 0  # ids before this index have been emitted

    def push(self, token_id: int) -> str:
        """The new text this id completes ('' for audio/special ids and held-back partial characters)."""
        if not self.tokenizer.is_text(token_id):
            return ""
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """What is still held back (an incomplete character decodes to U+FFFD), at the end of generation."""
        return self._emit(final=True) if self._read < len(self.ids) else ""

    def _emit(self, final: bool) -> str:
        decode = self.tokenizer._decode
        before = decode(self.ids[self._prefix:self._read])
        text = decode(self.ids[self._prefix:])
        if not final and (text.endswith("\ufffd") or len(text) <= len(before)):
            return ""  # an incomplete character (or nothing yet): wait for more bytes
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before):]

