"""An independent VITA-Audio implementation from transformers' own Qwen2 modules, no KV cache.

Every token is recomputed from scratch over the whole sequence: the LLM is a stock
`Qwen2ForCausalLM` holding layers 0..L-1; MCTP module k is written out as the spec's formula
around a stock `Qwen2DecoderLayer` holding layer L+k. Tests compare the runtime against it.
"""
from __future__ import annotations

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
