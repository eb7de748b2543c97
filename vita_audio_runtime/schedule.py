"""Inference modes: which path (the LLM or MCTP module k) produces each generated token."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Iterator, Sequence

LLM = -1  # producer id of the LLM; module k is producer k


class Mode(Enum):
    """The four published modes as [M1, m1, M2, m2, ...] lists (the last pair repeats)."""

    VANILLA = (8192, 0)
    BALANCE = (1, 4, 3, 8, 4, 10)
    BOOST = (1, 10, 4, 10)
    TURBO = (1, 10)

    @classmethod
    def parse(cls, mode: "str | Mode | Sequence[int]") -> tuple[int, ...]:
        """A mode name ("boost"), a Mode, or a custom list ("1,10,4,10" or [1, 10, 4, 10])."""
        if isinstance(mode, Mode):
            return mode.value
        if isinstance(mode, str):
            name = mode.strip()
            if name.upper() in cls.__members__:
                return cls[name.upper()].value
            try:
                counts = tuple(int(c) for c in name.split(","))
            except ValueError:
                raise ValueError(f"unknown mode {mode!r}: expected one of "
                                 f"{', '.join(m.lower() for m in cls.__members__)} or a list like 1,10,4,10") from None
            return validate_mode(counts)
        return validate_mode(tuple(int(c) for c in mode))


def validate_mode(counts: tuple[int, ...]) -> tuple[int, ...]:
    if len(counts) == 0 or len(counts) % 2:
        raise ValueError(f"mode list {list(counts)} must have an even, non-zero length: [M1, m1, M2, m2, ...]")
    if counts[0] < 1:
        raise ValueError(f"mode list {list(counts)} must start with at least one LLM step (first count >= 1)")
    if any(c < 0 for c in counts):
        raise ValueError(f"mode list {list(counts)} has a negative count")
    if all(c == 0 for c in counts[0::2][-1:]) and all(c == 0 for c in counts[1::2][-1:]):
        raise ValueError(f"mode list {list(counts)} ends with a pair of zeros: it would never produce a token")
    return counts


def expand(mode: "str | Mode | Sequence[int]", length: int) -> str:
    """The mode's slot string over generated indices 0..length-1: 'M' LLM slots, 'm' MCTP slots."""
    counts = Mode.parse(mode)
    big, small = counts[0::2], counts[1::2]
    out: list[str] = []
    i = 0
    while len(out) < length:  # counts are capped at what is still needed: [10**9, 1] is fine
        out += ["M"] * min(big[min(i, len(big) - 1)], length - len(out))
        out += ["m"] * min(small[min(i, len(small) - 1)], length - len(out))
        i += 1
    return "".join(out[:length])


def producers(mode: "str | Mode | Sequence[int]", num_modules: int, length: int) -> list[int]:
    """Producer of each generated index: LLM (-1) or module k (the k-th 'm' since the last LLM step).

    A run of 'm' longer than num_modules falls through to the LLM, which restarts the count.
    """
    result, k = [], 0
    for slot in expand(mode, length):
        if slot == "m" and k < num_modules:
            result.append(k)
            k += 1
        else:
            result.append(LLM)
            k = 0
    return result


@dataclass(frozen=True)
class Step:
    """One unit of device work between two host reads: an LLM step, or a burst of modules 0..B-1."""

    modules: int  # 0 for an LLM step, else B, the burst length

    @property
    def is_llm(self) -> bool:
        return self.modules == 0

    @property
    def tokens(self) -> int:
        return 1 if self.is_llm else self.modules


def steps(mode: "str | Mode | Sequence[int]", num_modules: int, max_new_tokens: int) -> Iterator[Step]:
    """Group producers into steps: each LLM slot alone, each consecutive run 0..B-1 as one burst."""
    prods = producers(mode, num_modules, max_new_tokens)
    i = 0
    while i < len(prods):
        if prods[i] == LLM:
            yield Step(0)
            i += 1
            continue
        b = 0
        while i + b < len(prods) and prods[i + b] == b:
            b += 1
        yield Step(b)
        i += b
