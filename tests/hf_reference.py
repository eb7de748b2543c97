"""An independent VITA-Audio implementation from transformers' own Qwen2 modules, no KV cache.

Every token is recomputed from scratch over the whole sequence: the LLM is a stock
`Qwen2ForCausalLM` holding layers 0..L-1; MCTP module k is written out as the spec's formula
around a stock `Qwen2DecoderLayer` holding layer L+k. Tests compare the runtime against it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from vita_audio_runtime.config import VitaConfig
from vita_audio_runtime.schedule import LLM, producers


def hf_config(cfg: VitaConfig) -> Qwen2Config:
    c = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                    num_hidden_layers=cfg.num_llm_layers, num_attention_heads=cfg.num_attention_heads,
                    num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
                    rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                    max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False)
    c._attn_implementation = "eager"
    return c


class HFReference:
    def __init__(self, cfg: VitaConfig, tensors: dict[str, torch.Tensor]):
        self.cfg = cfg
        hc = hf_config(cfg)
        self.llm = Qwen2ForCausalLM(hc).eval()
        llm_names = set(self.llm.state_dict())
        missing, unexpected = self.llm.load_state_dict({k: v for k, v in tensors.items() if k in llm_names},
                                                       strict=True), None
        del missing, unexpected
        self.rotary = Qwen2RotaryEmbedding(hc)
        self.layers, self.emb_norms, self.hid_norms, self.projs = [], [], [], []
        for k in range(cfg.num_mtp_modules):
            layer = Qwen2DecoderLayer(hc, layer_idx=0).eval()
            prefix = f"model.layers.{cfg.num_llm_layers + k}."
            layer.load_state_dict({n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)})
            self.layers.append(layer)
            for norms, name in ((self.emb_norms, "mtp_embed_norms"), (self.hid_norms, "mtp_hidden_norms")):
                norm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
                norm.weight.data.copy_(tensors[f"{name}.{k}.weight"])
                norms.append(norm)
            self.projs.append(tensors[f"mtp_projs.{k}.weight"])

    @torch.no_grad()
    def llm_hidden_and_logits(self, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-norm hidden [T, H] and logits [T, V] of the LLM over the whole sequence."""
        out = self.llm(torch.tensor([tokens]), output_hidden_states=True)
        return out.hidden_states[-1][0], out.logits[0]

    @torch.no_grad()
    def module_forward(self, k: int, tokens: list[int], h: torch.Tensor) -> torch.Tensor:
        """Module k over rows 0..R-1 given h_k [R, H]: returns h_{k+1} = norm(v) [R, H]."""
        rows = h.shape[0]
        ids = torch.tensor(tokens[k + 1: k + 1 + rows])
        e = self.emb_norms[k](self.llm.model.embed_tokens(ids))
        u = torch.cat([e, self.hid_norms[k](h)], dim=-1) @ self.projs[k].T  # embedding half first
        positions = torch.arange(rows)[None] + k + 1  # module k's RoPE position for row j is j + k + 1
        cos_sin = self.rotary(u[None], positions)
        mask = torch.full((rows, rows), float("-inf")).triu(1)[None, None]
        v = self.layers[k](u[None], attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
        v = v[0] if isinstance(v, tuple) else v
        return self.llm.model.norm(v[0])

    @torch.no_grad()
    def next_logits(self, tokens: list[int], producer: int) -> torch.Tensor:
        """Logits of the next token as `producer` computes it, recomputed from scratch."""
        if producer == LLM:
            return self.llm_hidden_and_logits(tokens)[1][-1]
        llm_rows = len(tokens) - producer - 1  # module k's last row predicts k + 1 places ahead
        h = self.llm_hidden_and_logits(tokens[:llm_rows])[0]
        for k in range(producer + 1):
            h = self.module_forward(k, tokens, h)
        return self.llm.lm_head(h[-1])

    def generate(self, prompt: list[int], mode, max_new_tokens: int) -> tuple[list[int], list[int]]:
        """Greedy tokens and producers, every token recomputed from scratch (no EOS stop)."""
        tokens, made = list(prompt), producers(mode, self.cfg.num_mtp_modules, max_new_tokens)
        for producer in made:
            tokens.append(int(self.next_logits(tokens, producer).argmax()))
        return tokens[len(prompt):], made


class TeacherForcedReference:
    """Teacher-forced logits from transformers' Qwen2 modules, one decoder layer at a time.

    Given prompt + generated ids and the producer of each generated id, one causal pass of the
    LLM over the whole sequence and one pass of each MCTP module over every row it can see give,
    for every generated position, the logits of the path that produced it: the LLM's at the row
    before it, module k's at the row k + 2 before it (module k's last row j predicts x_{j+k+2}:
    its input at row j is the previous level's post-norm hidden and the embedding of x_{j+k+1}).
    Causality makes these equal to a recompute from scratch at each step (`HFReference.next_logits`).

    Each layer's weights are upcast from the checkpoint tensors (any dtype, any device; left
    untouched) to `compute_dtype` only while that layer runs, so an fp32 reference of a bf16 7B
    model needs ~1 GB beyond the bf16 weights (one layer, 0.93 GB in fp32) plus the head upcast
    (2.4 GB), not a 41 GB fp32 copy of the model.
    """

    def __init__(self, cfg: VitaConfig, tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype = torch.float32):
        self.cfg, self.tensors, self.dtype = cfg, tensors, compute_dtype
        self.hc = hf_config(cfg)
        self.device = tensors["model.embed_tokens.weight"].device
        self.rotary = Qwen2RotaryEmbedding(self.hc).to(self.device)

    def _weights(self, prefix: str) -> dict[str, torch.Tensor]:
        return {n[len(prefix):]: t.to(self.dtype) for n, t in self.tensors.items() if n.startswith(prefix)}

    def _layer(self, index: int) -> Qwen2DecoderLayer:
        with torch.device("meta"):  # no random initialisation: the real weights are assigned below
            layer = Qwen2DecoderLayer(self.hc, layer_idx=0)
        layer.load_state_dict(self._weights(f"model.layers.{index}."), strict=True, assign=True)
        return layer.eval()

    def _norm(self, name: str) -> Qwen2RMSNorm:
        with torch.device("meta"):
            norm = Qwen2RMSNorm(self.cfg.hidden_size, self.cfg.rms_norm_eps)
        norm.load_state_dict({"weight": self.tensors[name].to(self.dtype)}, assign=True)
        return norm

    def _run_layer(self, index: int, x: torch.Tensor, position_offset: int) -> torch.Tensor:
        """Decoder layer `index` over rows x [R, H], causal, RoPE positions offset + 0..R-1."""
        rows = x.shape[0]
        positions = torch.arange(rows, device=self.device)[None] + position_offset
        mask = torch.full((rows, rows), float("-inf"), device=self.device, dtype=self.dtype).triu(1)[None, None]
        out = self._layer(index)(x[None], attention_mask=mask, position_ids=positions,
                                 position_embeddings=self.rotary(x[None], positions))
        return (out[0] if isinstance(out, tuple) else out)[0]

    def logits(self, tokens: list[int], made: list[int]) -> torch.Tensor:
        """[G, V] logits in compute_dtype: row g is what produced tokens[-G + g], per `made[g]`
        (LLM or module k), given every earlier token of `tokens` (prompt + G generated ids).

        fp32 matmuls run in IEEE fp32 for the call (no TF32, whose 10-bit mantissa is bf16-like)."""
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            return self._logits(tokens, made)
        finally:
            torch.set_float32_matmul_precision(previous)

    @torch.no_grad()
    def _logits(self, tokens: list[int], made: list[int]) -> torch.Tensor:
        cfg, total, count = self.cfg, len(tokens), len(made)
        if not 0 < count < total:
            raise ValueError(f"{count} producers for {total} tokens: expected 1..{total - 1} (the prompt comes first)")
        first = total - count  # position of the first generated token
        ids = torch.tensor(tokens, device=self.device)
        embed = self.tensors["model.embed_tokens.weight"]
        final_norm = self._norm("model.norm.weight")
        x = embed[ids].to(self.dtype)
        for i in range(cfg.num_llm_layers):
            x = self._run_layer(i, x, 0)
        levels = [final_norm(x)]  # levels[k]: h_k, the post-norm input of module k, one row per position
        deepest = max(made)
        for k in range(deepest + 1):
            rows = total - k - 1  # module k's row j reads x_{j+k+1}, which must exist
            e = self._norm(f"mtp_embed_norms.{k}.weight")(embed[ids[k + 1: k + 1 + rows]].to(self.dtype))
            h = self._norm(f"mtp_hidden_norms.{k}.weight")(levels[k][:rows])
            u = torch.cat([e, h], dim=-1) @ self.tensors[f"mtp_projs.{k}.weight"].to(self.dtype).T  # embedding first
            levels.append(final_norm(self._run_layer(cfg.num_llm_layers + k, u, k + 1)))
        # The hidden row behind generated position t: the LLM's row t - 1, module k's row t - k - 2.
        rows = [levels[0][first + g - 1] if p == LLM else levels[p + 1][first + g - p - 2] for g, p in enumerate(made)]
        return torch.stack(rows) @ self.tensors["lm_head.weight"].to(self.dtype).T


@dataclass
class StepVerdict:
    """One generated token against the reference logits of the path that produced it."""

    index: int  # generated index g
    producer: int  # LLM (-1) or module k
    token: int  # the checked engine's token
    best: int  # the reference argmax
    gap: float  # reference max logit - reference logit of `token` (>= 0)
    ulp: float  # one ulp of the engine's dtype at the reference max logit
    margin: float  # the accepted gap

    @property
    def verdict(self) -> str:
        return "argmax" if self.gap == 0 else ("margin" if self.gap <= self.margin else "OUTSIDE")

    def describe(self) -> str:
        name = "llm" if self.producer == LLM else f"mtp{self.producer}"
        return (f"index {self.index} ({name}): token {self.token}, reference argmax {self.best}, gap {self.gap:.4g} "
                f"= {self.gap / self.ulp:.2f} ulp (margin {self.margin:.4g}): {self.verdict}")


@dataclass
class TeacherForcedReport:
    """The verdicts of a whole generation and the rule they are held to."""

    steps: list[StepVerdict]
    margin_ulps: float
    max_margin_share: float

    @property
    def margin_uses(self) -> list[StepVerdict]:
        return [s for s in self.steps if s.verdict == "margin"]

    @property
    def outside(self) -> list[StepVerdict]:
        return [s for s in self.steps if s.verdict == "OUTSIDE"]

    @property
    def allowed_margin_uses(self) -> int:
        return math.floor(self.max_margin_share * len(self.steps))

    @property
    def passed(self) -> bool:
        return not self.outside and len(self.margin_uses) <= self.allowed_margin_uses

    def summary(self) -> str:
        n, used = len(self.steps), len(self.margin_uses)
        return (f"{n - used - len(self.outside)}/{n} reference argmax, {used} within the {self.margin_ulps:g}-ulp margin "
                f"({100 * used / max(n, 1):.1f}%, at most {self.allowed_margin_uses} allowed), "
                f"{len(self.outside)} outside it")

    def text(self) -> str:
        """The summary and every step that was not the reference argmax."""
        return "\n".join([self.summary()] + [s.describe() for s in self.steps if s.verdict != "argmax"])


def teacher_forced_check(logits: torch.Tensor, tokens: list[int], made: list[int], dtype: torch.dtype,
                         margin_ulps: float, max_margin_share: float) -> TeacherForcedReport:
    """Hold generated `tokens` (made by `made`, an engine computing in `dtype`) to reference
    `logits` [G, V] (`TeacherForcedReference.logits` of the same sequence).

    A token passes when it is the reference argmax, or when its reference logit is within
    `margin_ulps` ulps of `dtype` (at the step's reference max logit) of the max; the report
    fails if any token is outside that margin or more than `max_margin_share` of the tokens
    needed it.
    """
    if logits.shape[0] != len(tokens) or len(made) != len(tokens):
        raise ValueError(f"logits for {logits.shape[0]} steps, {len(tokens)} tokens and {len(made)} producers: "
                         "expected one of each per generated token")
    ref = logits.double()
    best = ref.max(dim=-1)
    chosen = ref.gather(1, torch.tensor(tokens, device=ref.device)[:, None]).squeeze(1)
    gaps = (best.values - chosen).tolist()
    # One ulp at |max|: eps(dtype) (2^-7 for bf16, 2^-23 for fp32) times the power of two below it.
    scale = best.values.abs().clamp_min(torch.finfo(torch.float32).tiny)
    ulps = (torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(scale)))).tolist()
    steps = [StepVerdict(g, p, t, b, gap, ulp, margin_ulps * ulp)
             for g, (p, t, b, gap, ulp) in enumerate(zip(made, tokens, best.indices.tolist(), gaps, ulps))]
    return TeacherForcedReport(steps, margin_ulps, max_margin_share)
