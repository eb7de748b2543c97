"""The VITA-Audio model written once over a kernel backend: the LLM and its N MCTP modules.

Forward functions read and write the static state (KV cache, hidden history, token buffer)
at device-side positions, so the same code runs eagerly and inside captured CUDA graphs.
Hidden rows are stored raw (before the shared final norm); every consumer (the head, the next
module's input) applies the norm in its own prologue.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vita_audio_runtime.config import VitaConfig
from vita_kernels.backend import KernelBackend
from vita_kernels.qkv_rope import rope_tables
from vita_kernels.sampling import SamplingParams, select_next


@dataclass
class LayerWeights:
    """One Qwen2 decoder layer, with q/k/v and gate/up concatenated for the fused kernels."""

    input_norm: torch.Tensor  # [H]
    w_qkv: torch.Tensor  # [(nq + 2 nkv) d, H]
    b_qkv: torch.Tensor  # [(nq + 2 nkv) d]
    w_o: torch.Tensor  # [H, nq d]
    post_norm: torch.Tensor  # [H]
    w_gate_up: torch.Tensor  # [2 I, H], gate rows first
    w_down: torch.Tensor  # [H, I]

    @classmethod
    def take(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "LayerWeights":
        """Build from checkpoint tensors, removing them from `tensors` so the originals can be
        freed as soon as their concatenations exist."""
        t = {name[len(prefix) + 1:]: tensors.pop(name) for name in list(tensors) if name.startswith(prefix + ".")}
        a = "self_attn."
        return cls(
            input_norm=t["input_layernorm.weight"],
            w_qkv=torch.cat([t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"]]),
            b_qkv=torch.cat([t[a + "q_proj.bias"], t[a + "k_proj.bias"], t[a + "v_proj.bias"]]),
            w_o=t[a + "o_proj.weight"], post_norm=t["post_attention_layernorm.weight"],
            w_gate_up=torch.cat([t["mlp.gate_proj.weight"], t["mlp.up_proj.weight"]]),
            w_down=t["mlp.down_proj.weight"],
        )


@dataclass
class MTPWeights:
    emb_norm: torch.Tensor  # [H]
    hid_norm: torch.Tensor  # [H]
    w_proj: torch.Tensor  # [H, 2H], embedding half first


class DecodeState:
    """Everything one generation writes, preallocated once for batch 1 and max_seq_len rows.

    tokens[t]: every id (prompt, then generated); the engine keeps every read and write below S;
    hidden[0][j]: the LLM's raw output at row j; hidden[k][j] (k >= 1): module k-1's raw output;
    seen: which ids occurred so far (repetition penalty); kv_k / kv_v: [L + N, nkv, S, d].
    """

    def __init__(self, cfg: VitaConfig, max_seq_len: int, device: torch.device, dtype: torch.dtype):
        n, s = cfg.num_mtp_modules, max_seq_len
        kv_shape = (cfg.num_layers_total, cfg.num_key_value_heads, s, cfg.head_dim)
        self.kv_k = torch.zeros(kv_shape, device=device, dtype=dtype)
        self.kv_v = torch.zeros(kv_shape, device=device, dtype=dtype)
        self.hidden = torch.zeros((n, s, cfg.hidden_size), device=device, dtype=dtype)
        self.tokens = torch.zeros(s, device=device, dtype=torch.int64)
        self.seen = torch.zeros(cfg.vocab_size, device=device, dtype=torch.bool)

    @property
    def kv_cache_bytes(self) -> int:
        return 2 * self.kv_k.numel() * self.kv_k.element_size()

    @property
    def bytes(self) -> int:
        return self.kv_cache_bytes + sum(t.numel() * t.element_size() for t in (self.hidden, self.tokens, self.seen))


class Workspace:
    """Activation buffers for steps of exactly `rows` rows (fixed addresses for graph replay)."""

    def __init__(self, cfg: VitaConfig, rows: int, device: torch.device, dtype: torch.dtype):
        h, d = cfg.hidden_size, cfg.head_dim
        self.rows = rows
        self.offsets = torch.arange(rows, device=device, dtype=torch.int64)
        self.row_index = torch.zeros(rows, device=device, dtype=torch.int64)
        self.ahead_index = torch.zeros(rows, device=device, dtype=torch.int64)
        self.ids = torch.zeros(rows, device=device, dtype=torch.int64)
        self.h_in = torch.zeros((rows, h), device=device, dtype=dtype)
        self.x = torch.zeros((rows, h), device=device, dtype=dtype)
        self.x1 = torch.zeros((rows, h), device=device, dtype=dtype)
        self.q = torch.zeros((rows, cfg.num_attention_heads, d), device=device, dtype=dtype)
        self.attn = torch.zeros((rows, cfg.num_attention_heads * d), device=device, dtype=dtype)
        self.mlp = torch.zeros((rows, cfg.intermediate_size), device=device, dtype=dtype)
        self.logits = torch.zeros((1, cfg.vocab_size), device=device, dtype=torch.float32)
        self.next_id = torch.zeros(1, device=device, dtype=torch.int64)
        self.next_slot = torch.zeros(1, device=device, dtype=torch.int64)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))


class VitaModel:
    """LLM layers 0..L-1 + shared norm/head, and N MCTP modules, over one kernel backend.

    Takes the tensors out of `tensors` (which is left empty), so q/k/v and gate/up are never held
    twice over: pass `dict(tensors)` to keep your own mapping.
    """

    def __init__(self, cfg: VitaConfig, tensors: dict[str, torch.Tensor], ops: KernelBackend,
                 max_positions: int):
        self.cfg, self.ops = cfg, ops
        self.embed = tensors.pop("model.embed_tokens.weight")
        self.final_norm = tensors.pop("model.norm.weight")
        self.lm_head = tensors.pop("lm_head.weight")
        self.layers = [LayerWeights.take(tensors, f"model.layers.{i}") for i in range(cfg.num_layers_total)]
        self.mtp = [MTPWeights(tensors.pop(f"mtp_embed_norms.{k}.weight"), tensors.pop(f"mtp_hidden_norms.{k}.weight"),
                               tensors.pop(f"mtp_projs.{k}.weight")) for k in range(cfg.num_mtp_modules)]
        if tensors:
            raise ValueError(f"unused checkpoint tensors: {sorted(tensors)[:3]}")
        self.device, self.dtype = self.embed.device, self.embed.dtype
        # Module k's RoPE position for row j is j + k + 1, so the tables reach max_positions + N.
        self.rope_cos, self.rope_sin = rope_tables(cfg.head_dim, cfg.rope_theta,
                                                   max_positions + cfg.num_mtp_modules + 1, self.device)

    @property
    def weight_bytes(self) -> int:
        ts = [self.embed, self.final_norm, self.lm_head]
        ts += [t for layer in self.layers for t in vars(layer).values()]
        ts += [t for m in self.mtp for t in vars(m).values()]
        return sum(t.numel() * t.element_size() for t in ts)

    def _layer(self, index: int, st: DecodeState, ws: Workspace, pos: torch.Tensor, rope_offset: int,
               kv_bound: int) -> None:
        """ws.x <- DecoderLayer_index(ws.x) for ws.rows rows at cache slots pos.., in place.

        kv_bound: a static upper bound on pos + rows; attention is handed only that many cache
        slots (the fused kernel stops at pos + rows anyway; the masked reference gets cheaper).
        """
        cfg, ops, w = self.cfg, self.ops, self.layers[index]
        k_cache, v_cache = st.kv_k[index], st.kv_v[index]
        ops.qkv_rope_cache(ws.x, w.input_norm, w.w_qkv, w.b_qkv, self.rope_cos, self.rope_sin, k_cache, v_cache,
                           pos, rope_offset, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps,
                           out=ws.q)
        ops.attention(ws.q, k_cache[:, :kv_bound], v_cache[:, :kv_bound], pos, out=ws.attn)
        ops.linear(ws.attn, w.w_o, None, ws.x, out=ws.x1)  # x1 = x + o_proj(attn)
        ops.norm_gate_up(ws.x1, w.post_norm, w.w_gate_up, cfg.rms_norm_eps, out=ws.mlp)
        ops.linear(ws.mlp, w.w_down, None, ws.x1, out=ws.x)  # x = x1 + down_proj(mlp)

    def llm_step(self, st: DecodeState, ws: Workspace, pos: torch.Tensor, kv_bound: int) -> None:
        """LLM over tokens[pos : pos+R] (chunked prefill); raw rows -> hidden[0]."""
        torch.add(ws.offsets, pos, out=ws.row_index)
        torch.index_select(st.tokens, 0, ws.row_index, out=ws.ids)
        torch.index_select(self.embed, 0, ws.ids, out=ws.x)
        for i in range(self.cfg.num_llm_layers):
            self._layer(i, st, ws, pos, 0, kv_bound)
        st.hidden[0].index_copy_(0, ws.row_index, ws.x)

    def mtp_step(self, k: int, st: DecodeState, ws: Workspace, pos: torch.Tensor, kv_bound: int) -> None:
        """Module k over rows pos..pos+R-1: reads hidden[k] and tokens row+k+1; writes hidden[k+1]."""
        cfg, m = self.cfg, self.mtp[k]
        torch.add(ws.offsets, pos, out=ws.row_index)
        torch.index_select(st.hidden[k], 0, ws.row_index, out=ws.h_in)
        torch.add(ws.row_index, k + 1, out=ws.ahead_index)
        torch.index_select(st.tokens, 0, ws.ahead_index, out=ws.ids)
        self.ops.mtp_input(ws.ids, self.embed, ws.h_in, self.final_norm, m.emb_norm, m.hid_norm, m.w_proj,
                           cfg.rms_norm_eps, out=ws.x)
        self._layer(cfg.num_llm_layers + k, st, ws, pos, k + 1, kv_bound)
        if k + 1 < cfg.num_mtp_modules:  # the last module's rows feed nothing but its head
            st.hidden[k + 1].index_copy_(0, ws.row_index, ws.x)

    def emit(self, st: DecodeState, ws: Workspace, pos: torch.Tensor, ahead: int, params: SamplingParams,
             generator: torch.Generator | None) -> None:
        """Head on the step's last row; the chosen id goes to tokens[pos + R + ahead] and `seen`.

        ahead is 0 for the LLM and k + 1 for module k (its last row predicts k + 1 further on).
        """
        last = ws.x[ws.rows - 1:]
        eps = self.cfg.rms_norm_eps
        if params.fused_greedy:
            self.ops.head_argmax(last, self.final_norm, self.lm_head, eps, out=ws.next_id)
        else:
            self.ops.head_logits(last, self.final_norm, self.lm_head, eps, out=ws.logits)
            select_next(ws.logits, st.seen, params, generator, out=ws.next_id)
        torch.add(pos, ws.rows + ahead, out=ws.next_slot)
        st.tokens.index_copy_(0, ws.next_slot, ws.next_id)
        st.seen.index_fill_(0, ws.next_id, True)
