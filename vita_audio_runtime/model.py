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
from vita_kernels.head import write_emitted
from vita_kernels.qkv_rope import rope_tables
from vita_kernels.sampling import select_next


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
    """Everything generation writes, preallocated once: `regions` sequence regions of
    max_seq_len rows each (one per batch slot, plus a scratch region for padding rows).

    Row j of the sequence in region b is flat row b * S + j of every per-row buffer:
    tokens[b S + j]: every id (prompt, then generated); hidden[0][b S + j]: the LLM's raw output;
    hidden[k][b S + j] (k >= 1): module k-1's raw output (hidden[N], the last module's, feeds
    only its head: each step's last layer writes its rows straight into the history and the
    head reads them there); seen[b]: which ids occurred in region b's sequence (repetition
    penalty); kv_k / kv_v: [L + N, nkv, regions * S, d].
    """

    def __init__(self, cfg: VitaConfig, max_seq_len: int, regions: int, device: torch.device, dtype: torch.dtype):
        n, s = cfg.num_mtp_modules, max_seq_len
        self.max_seq_len, self.regions = max_seq_len, regions
        kv_shape = (cfg.num_layers_total, cfg.num_key_value_heads, regions * s, cfg.head_dim)
        self.kv_k = torch.zeros(kv_shape, device=device, dtype=dtype)
        self.kv_v = torch.zeros(kv_shape, device=device, dtype=dtype)
        self.hidden = torch.zeros((n + 1, regions * s, cfg.hidden_size), device=device, dtype=dtype)
        self.tokens = torch.zeros(regions * s, device=device, dtype=torch.int64)
        self.seen = torch.zeros((regions, cfg.vocab_size), device=device, dtype=torch.bool)

    @property
    def kv_cache_bytes(self) -> int:
        return 2 * self.kv_k.numel() * self.kv_k.element_size()

    @property
    def bytes(self) -> int:
        return self.kv_cache_bytes + sum(t.numel() * t.element_size() for t in (self.hidden, self.tokens, self.seen))


# The int64 row and sequence tables of a step, in the order they sit in one upload buffer:
# per row: flat row (cache slot, hidden row, token index), position in its sequence, flat index
# of the token its module reads (k + 1 ahead); per sequence: first row and row count (the
# attention grid); per emitting sequence: the flat row its head reads, the flat index its token
# goes to, and its region (the seen mask's row).
ROW_FIELDS = ("flat", "positions", "ahead")
EMIT_FIELDS = ("last_flat", "next_flat", "emit_regions")
# Arrival counters of the fused kernels' in-launch reductions (split-K tiles, head row blocks,
# split-KV groups: at most ~900 per launch at 7B); zeroed once, left zeroed by every launch.
COUNTERS = 1 << 14


class Workspace:
    """Activation buffers and step tables for steps of `rows` rows in at most `num_seqs`
    sequences (fixed addresses, so a captured graph can be replayed on new tables)."""

    def __init__(self, cfg: VitaConfig, rows: int, num_seqs: int, device: torch.device, dtype: torch.dtype):
        h, d = cfg.hidden_size, cfg.head_dim
        self.rows, self.num_seqs = rows, num_seqs
        self.max_seq_rows = rows
        per_row, seq_end = len(ROW_FIELDS) * rows, len(ROW_FIELDS) * rows + 2 * num_seqs
        self.table = torch.zeros(seq_end + len(EMIT_FIELDS) * num_seqs, device=device, dtype=torch.int64)
        self.flat, self.positions, self.ahead = self.table[:per_row].view(len(ROW_FIELDS), rows)
        self.seqs = self.table[per_row:seq_end].view(num_seqs, 2)
        self.last_flat, self.next_flat, self.emit_regions = self.table[seq_end:].view(len(EMIT_FIELDS), num_seqs)
        self.counters = torch.zeros(COUNTERS, device=device, dtype=torch.int32)
        self.ids = torch.zeros(rows, device=device, dtype=torch.int64)
        self.x = torch.zeros((rows, h), device=device, dtype=dtype)
        self.x1 = torch.zeros((rows, h), device=device, dtype=dtype)
        self.q = torch.zeros((rows, cfg.num_attention_heads, d), device=device, dtype=dtype)
        self.attn = torch.zeros((rows, cfg.num_attention_heads * d), device=device, dtype=dtype)
        self.mlp = torch.zeros((rows, cfg.intermediate_size), device=device, dtype=dtype)
        self.logits = torch.zeros((num_seqs, cfg.vocab_size), device=device, dtype=torch.float32)
        self.next_id = torch.zeros(num_seqs, device=device, dtype=torch.int64)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values()
                   if isinstance(t, torch.Tensor) and t._base is None)


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

    def _layer(self, index: int, st: DecodeState, ws: Workspace, rope_offset: int, window: int,
               level: int | None = None) -> None:
        """ws.x <- DecoderLayer_index(ws.x) for the step's rows at their cache slots, in place; with
        `level`, the output rows go straight into the hidden history st.hidden[level] instead.

        window: a static bound on every row's position + 1 (the reference attention reads only
        that many slots of each region; the fused kernel stops at each row's own slot anyway).
        """
        cfg, ops, w = self.cfg, self.ops, self.layers[index]
        k_cache, v_cache = st.kv_k[index], st.kv_v[index]
        ops.qkv_rope_cache(ws.x, w.input_norm, w.w_qkv, w.b_qkv, self.rope_cos, self.rope_sin, k_cache, v_cache,
                           ws.flat, ws.positions, rope_offset, cfg.num_attention_heads, cfg.num_key_value_heads,
                           cfg.rms_norm_eps, out=ws.q)
        ops.attention(ws.q, k_cache, v_cache, ws.flat, ws.positions, out=ws.attn, seqs=ws.seqs,
                      max_seq_rows=ws.max_seq_rows, window=window, counters=ws.counters)
        ops.linear(ws.attn, w.w_o, None, ws.x, out=ws.x1, counters=ws.counters)  # x1 = x + o_proj(attn)
        ops.norm_gate_up(ws.x1, w.post_norm, w.w_gate_up, cfg.rms_norm_eps, out=ws.mlp)
        if level is None:  # x = x1 + down_proj(mlp)
            ops.linear(ws.mlp, w.w_down, None, ws.x1, out=ws.x, counters=ws.counters)
        else:
            ops.linear(ws.mlp, w.w_down, None, ws.x1, out=st.hidden[level], out_rows=ws.flat, counters=ws.counters)

    def llm_step(self, st: DecodeState, ws: Workspace, window: int) -> None:
        """LLM over the step's rows (chunked prefill, per sequence); raw rows -> hidden[0]."""
        torch.index_select(st.tokens, 0, ws.flat, out=ws.ids)
        torch.index_select(self.embed, 0, ws.ids, out=ws.x)
        last = self.cfg.num_llm_layers - 1
        for i in range(self.cfg.num_llm_layers):
            self._layer(i, st, ws, 0, window, level=0 if i == last else None)

    def mtp_step(self, k: int, st: DecodeState, ws: Workspace, window: int) -> None:
        """Module k over the step's rows: reads hidden[k] and the tokens k + 1 ahead (gathered by
        its input kernel); writes hidden[k+1]."""
        cfg, m = self.cfg, self.mtp[k]
        self.ops.mtp_input(st.tokens, self.embed, st.hidden[k], self.final_norm, m.emb_norm, m.hid_norm, m.w_proj,
                           cfg.rms_norm_eps, out=ws.x, id_rows=ws.ahead, hidden_rows=ws.flat, counters=ws.counters)
        self._layer(cfg.num_llm_layers + k, st, ws, k + 1, window, level=k + 1)

    def emit(self, st: DecodeState, ws: Workspace, level: int, samplers: list | None) -> None:
        """Head on each emitting sequence's last row (read from hidden[level]); its id goes to
        tokens[next_flat] and `seen`.

        samplers: None when every sequence decodes greedily with no penalty (the head's fused
        argmax writes token and seen mask itself), else one (SamplingParams, generator, region)
        per emitting sequence (padding entries included), each applied to its own row of logits
        with its region's seen mask.
        """
        eps = self.cfg.rms_norm_eps
        hidden = st.hidden[level]
        if samplers is None:
            self.ops.head_argmax(hidden, self.final_norm, self.lm_head, eps, out=ws.next_id, x_rows=ws.last_flat,
                                 tokens=st.tokens, token_index=ws.next_flat, seen=st.seen,
                                 seen_rows=ws.emit_regions, counters=ws.counters)
            return
        self.ops.head_logits(hidden, self.final_norm, self.lm_head, eps, out=ws.logits, x_rows=ws.last_flat)
        for i, (params, generator, region) in enumerate(samplers):
            select_next(ws.logits[i:i + 1], st.seen[region], params, generator, out=ws.next_id[i:i + 1])
        write_emitted(ws.next_id, st.tokens, ws.next_flat, st.seen, ws.emit_regions)
