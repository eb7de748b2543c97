"""Logits processing and token selection on the device, shared by the LLM and MCTP heads.

Order as in Hugging Face generation: repetition penalty (over every prior id, prompt
included), then, when sampling, temperature, top-k and top-p. Greedy decoding applies only the
penalty (the warpers never move the argmax). No full sort of the vocabulary: top-k uses
`torch.topk`, and top-p without top-k finds its probability threshold by bisection over the
fp32 bit patterns (31 masked sums), which keeps exactly the tokens Hugging Face's sorted
cumulative sum keeps, ties aside. Everything is shape-static and capturable in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. Greedy (`do_sample=False`) is the reference setting."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def fused_greedy(self) -> bool:
        """True when the head's fused argmax gives the answer (no logits need to be written)."""
        return not self.do_sample and self.repetition_penalty == 1.0


def process_logits_ref(logits: torch.Tensor, prior_ids: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The specification: Hugging Face's own logits processors applied to [R, V] fp32 logits.

    prior_ids: [T] int64, every id seen so far (prompt included). Filtered entries are -inf.
    """
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.do_sample:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    input_ids = prior_ids.reshape(1, -1).expand(logits.shape[0], -1)
    return processors(input_ids, logits.clone())


def _top_p_threshold(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Largest t with sum(p[p <= t]) <= 1 - top_p, per row, by bisection over fp32 bit patterns.

    Positive fp32 values order like their int32 bit patterns, so 31 halvings of the pattern
    range pin t to a neighbouring pair of floats: the cut is exact, with no sort.
    """
    budget = 1.0 - top_p
    lo = torch.zeros(probs.shape[0], 1, dtype=torch.int32, device=probs.device)
    hi = probs.amax(dim=-1, keepdim=True).view(torch.int32).clone()
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        t = mid.view(torch.float32)
        below = torch.where(probs <= t, probs, torch.zeros((), device=probs.device)).sum(-1, keepdim=True)
        fits = below <= budget
        lo = torch.where(fits, mid, lo)
        hi = torch.where(fits, hi, mid)
    return lo.view(torch.float32)


def process_logits(
    logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Same result as `process_logits_ref`, from a [V] bool mask of seen ids, without a full sort.

    logits: [R, V] fp32; seen: [V] bool on the same device. Returns [R, V] fp32 (-inf filtered).
    """
    if logits.dtype != torch.float32 or logits.dim() != 2:
        raise ValueError(f"logits must be a [R, V] float32 tensor, got {tuple(logits.shape)} {logits.dtype}")
    if seen.shape != logits.shape[-1:] or seen.dtype != torch.bool:
        raise ValueError(f"seen must be a [{logits.shape[-1]}] bool mask, got {tuple(seen.shape)} {seen.dtype}")
    x = logits
    if params.repetition_penalty != 1.0:
        p = params.repetition_penalty
        x = torch.where(seen, torch.where(x < 0, x * p, x / p), x)
    if params.do_sample:
        if params.temperature != 1.0:
            x = x / params.temperature
        neg_inf = torch.full((), float("-inf"), device=x.device)
        if params.top_k > 0:
            k = min(params.top_k, x.shape[-1])
            top = torch.topk(x, k, dim=-1).values  # [R, k], descending
            x = torch.where(x < top[:, -1:], neg_inf, x)
            if params.top_p < 1.0:
                # The nucleus lies inside the k survivors: HF's ascending cumulative sum over them.
                asc = top.flip(-1)
                cum = asc.softmax(dim=-1).cumsum(dim=-1)
                removed = cum <= 1.0 - params.top_p
                removed[:, -1] = False
                # Highest removed logit (or -inf when none): everything at or below it goes.
                cut = torch.where(removed, asc, neg_inf).amax(dim=-1, keepdim=True)
                x = torch.where(x <= cut, neg_inf, x)
        elif params.top_p < 1.0:
            probs = x.softmax(dim=-1)
            x = torch.where(probs <= _top_p_threshold(probs, params.top_p), neg_inf, x)
    if out is not None:
        out.copy_(x)
        return out
    return x if x is not logits else x.clone()


def select_next(
    logits: torch.Tensor,
    seen: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """ids [R] int64: argmax of the processed logits (greedy) or one draw from their softmax.

    The draw is the exponential race argmax(p / Exp(1)), distributed as multinomial(p) and
    free of host synchronisation, so it can live inside a captured graph.
    """
    x = process_logits(logits, seen, params)
    if params.do_sample:
        probs = x.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=generator)
        x = probs / noise
    ids = x.argmax(dim=-1)
    if out is not None:
        out.copy_(ids)
        return out
    return ids
