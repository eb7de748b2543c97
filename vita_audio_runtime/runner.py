"""The step runner: executes batched LLM steps and MCTP module steps eagerly or as CUDA-graph replays."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from vita_audio_runtime.model import DecodeState, VitaModel, Workspace
from vita_audio_runtime.scheduler import Span
from vita_kernels.sampling import SamplingParams


def bucket(n: int) -> int:
    """Padded size for graph keys: powers of two up to 16, then multiples of 16."""
    if n <= 16:
        return 1 << (n - 1).bit_length()
    return -(-n // 16) * 16


class DecodeRunner:
    """Owns the static decode state (one cache region per batch slot, plus a scratch region
    that padding rows write to), the workspaces and the captured graphs.

    Invariants:
    - max_batch and max_seq_len are fixed for the runner's life; every buffer (KV cache, hidden
      history, token buffer, seen masks, workspaces) keeps its address, so a graph stays valid;
    - between replays only device memory contents change: each step's row and sequence tables
      are uploaded into its workspace's `table` (through a ring of pinned host buffers, none
      rewritten before its previous copy has completed); tokens move through the state's token
      buffer;
    - a step is described by its spans (slot, first row, rows, emit); with graphs on, rows and
      sequences are padded to buckets (padding rows live in the scratch region, padding
      sequences have no rows), and one graph is captured per (kind, module, row bucket,
      sequence bucket, emit) up to `graph_max_rows` rows; longer steps run eagerly, as do steps
      where some sequence samples or applies a repetition penalty (each request's own
      generator and parameters);
    - inside a step nothing synchronises with the host; the engine reads the new tokens once
      per tick; after a key's graph is captured, replays allocate nothing.
    On a CPU (or with use_graphs=False) the same code runs eagerly, step for step.
    """

    STAGING_RING = 4  # pinned host buffers for table uploads, reused round-robin after an event

    def __init__(self, model: VitaModel, max_seq_len: int, max_batch: int, use_graphs: bool,
                 graph_max_rows: int | None = None, bucketed: bool | None = None):
        self.model, self.max_seq_len, self.max_batch = model, max_seq_len, max_batch
        self.device, self.dtype = model.device, model.dtype
        self.use_graphs = bool(use_graphs and self.device.type == "cuda")
        # Padded shapes on every CUDA device, graphs or not: the kernels' tile choices follow the
        # row count, so eager and replayed steps must see the same shapes to round alike.
        self.bucketed = self.device.type == "cuda" if bucketed is None else bucketed
        self.graph_max_rows = graph_max_rows or max(16, 16 * max_batch)
        self.scratch = max_batch  # the padding rows' region
        self.state = DecodeState(model.cfg, max_seq_len, max_batch + 1, self.device, self.dtype)
        self.workspaces: dict[tuple[int, int], Workspace] = {}
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.graph_pool_bytes = 0
        self._pool = None
        self.generators = [torch.Generator(device=self.device) for _ in range(max_batch)]
        self._staging: list[tuple[torch.Tensor | None, torch.cuda.Event | None]] = [(None, None)] * self.STAGING_RING
        self._staging_next = 0

    # -- buffers -----------------------------------------------------------------------------
    def workspace(self, rows: int, num_seqs: int) -> Workspace:
        """Buffers for a step: kept for graphable sizes (their addresses are baked into graphs),
        made afresh for longer eager steps, so prompts of many lengths do not accumulate them."""
        if rows > self.graph_max_rows:
            return Workspace(self.model.cfg, rows, num_seqs, self.device, self.dtype)
        key = (rows, num_seqs)
        if key not in self.workspaces:
            self.workspaces[key] = Workspace(self.model.cfg, rows, num_seqs, self.device, self.dtype)
        return self.workspaces[key]

    def memory_report(self) -> dict[str, int]:
        """Bytes held on the device: weights, KV cache (every slot's region), other state,
        workspaces, graph pool."""
        return {"weights": self.model.weight_bytes, "kv_cache": self.state.kv_cache_bytes,
                "state_other": self.state.bytes - self.state.kv_cache_bytes,
                "workspaces": sum(ws.bytes for ws in self.workspaces.values()),
                "graph_pool": self.graph_pool_bytes}

    def reset_slot(self, slot: int, prompt: Sequence[int], seed: int) -> None:
        """Start a request in `slot`: its prompt into the token buffer, its seen mask, its generator."""
        st, s = self.state, self.max_seq_len
        ids = torch.tensor(list(prompt), dtype=torch.int64).to(self.device)
        st.tokens[slot * s: slot * s + len(prompt)].copy_(ids)
        st.seen[slot].zero_()
        st.seen[slot].index_fill_(0, ids, True)
        self.generators[slot].manual_seed(seed)

    def read_tokens(self, reads: list[tuple[int, int, int]]) -> list[list[int]]:
        """The host's one read per tick: for each (slot, start, count), that slot's ids (synchronises)."""
        s = self.max_seq_len
        index = [slot * s + start + i for slot, start, count in reads for i in range(count)]
        flat = torch.index_select(self.state.tokens, 0, torch.tensor(index, device=self.device)).tolist()
        out, at = [], 0
        for _, _, count in reads:
            out.append(flat[at:at + count])
            at += count
        return out

    # -- steps -------------------------------------------------------------------------------
    def llm_step(self, spans: list[Span], params: list[SamplingParams]) -> None:
        """The LLM over each span's rows (one sequence each), emitting where span.emit;
        `params` are the emitting spans' sampling parameters, in order."""
        self._step(("llm",), spans, 0, 0, params, lambda ws, window: self.model.llm_step(self.state, ws, window))

    def mtp_step(self, k: int, spans: list[Span], params: list[SamplingParams]) -> None:
        """Module k over each span's rows, every span emitting its token k + 1 ahead."""
        self._step(("mtp", k), spans, k + 1, k + 1, params,
                   lambda ws, window: self.model.mtp_step(k, self.state, ws, window))

    def _step(self, kind: tuple, spans: list[Span], ahead: int, level: int, params: list[SamplingParams],
              forward: Callable[[Workspace, int], None]) -> None:
        emitters = [sp for sp in spans if sp.emit]
        greedy = all(p.fused_greedy for p in params)
        ws, window, padded = self.prepare(spans, ahead)
        graphed = self.use_graphs and padded and greedy
        samplers = None
        if not greedy:
            samplers = [(p, self.generators[sp.slot], sp.slot) for p, sp in zip(params, emitters)]
            samplers += [(SamplingParams(), None, self.scratch)] * (ws.num_seqs - len(emitters))

        def run() -> None:
            forward(ws, window)
            if emitters:
                self.model.emit(self.state, ws, level, samplers)

        self._execute(kind + (ws.rows, ws.num_seqs, bool(emitters)), graphed, run)

    def prepare(self, spans: list[Span], ahead: int, fresh: bool = False) -> tuple[Workspace, int, bool]:
        """The workspace for a step over `spans` with its tables uploaded: (workspace, attention
        window, padded). Padded (on a GPU, up to graph_max_rows rows): rows and sequences rounded
        up to buckets, the window the whole region, so the step can be captured. `fresh`: a new
        workspace of that size rather than the runner's shared one (for callers that keep it)."""
        s = self.max_seq_len
        rows = sum(sp.rows for sp in spans)
        padded = self.bucketed and rows <= self.graph_max_rows and bucket(rows) <= s
        rows_p, seqs_p = (bucket(rows), bucket(len(spans))) if padded else (rows, len(spans))
        ws = Workspace(self.model.cfg, rows_p, seqs_p, self.device, self.dtype) if fresh else self.workspace(rows_p, seqs_p)
        ws.max_seq_rows = rows_p if padded else max(sp.rows for sp in spans)
        window = s if padded else max(sp.first + sp.rows for sp in spans)

        flat, positions, seq_table, last_flat, next_flat, regions = [], [], [], [], [], []
        for sp in spans:
            if sp.emit:
                last_flat.append(sp.slot * s + sp.first + sp.rows - 1)
                next_flat.append(sp.slot * s + sp.first + sp.rows + ahead)
                regions.append(sp.slot)
            seq_table += [len(flat), sp.rows]
            positions += range(sp.first, sp.first + sp.rows)
            flat += range(sp.slot * s + sp.first, sp.slot * s + sp.first + sp.rows)
        ahead_flat = [f + ahead for f in flat]
        # Padding: rows in the scratch region, sequences with no rows, emits into scratch.
        pad_rows, pad_emit = rows_p - rows, seqs_p - len(last_flat)
        flat += range(self.scratch * s, self.scratch * s + pad_rows)
        positions += range(pad_rows)
        ahead_flat += [self.scratch * s] * pad_rows
        seq_table += [rows_p, 0] * (seqs_p - len(spans))
        last_flat += [self.scratch * s] * pad_emit
        next_flat += [self.scratch * s + s - 1] * pad_emit
        regions += [self.scratch] * pad_emit
        self._upload(ws, flat + positions + ahead_flat + seq_table + last_flat + next_flat + regions)
        return ws, window, padded

    def _upload(self, ws: Workspace, values: list[int]) -> None:
        """values -> ws.table with one copy; on a GPU through a pinned buffer that no pending
        copy still reads (each buffer's last copy is fenced by an event)."""
        host = torch.tensor(values, dtype=torch.int64)
        if self.device.type != "cuda":  # no asynchronous copy to fence
            ws.table.copy_(host)
            return
        i = self._staging_next
        self._staging_next = (i + 1) % self.STAGING_RING
        buf, event = self._staging[i]
        if event is not None:
            event.synchronize()  # the copy that last read this buffer has completed
        if buf is None or buf.numel() < host.numel():
            buf = torch.empty(max(host.numel(), 256), dtype=torch.int64, pin_memory=True)
            event = torch.cuda.Event()
        buf[:host.numel()].copy_(host)
        ws.table.copy_(buf[:host.numel()], non_blocking=True)
        event.record()
        self._staging[i] = (buf, event)

    def _execute(self, key: tuple, graphed: bool, run: Callable[[], None]) -> None:
        """Replay the key's graph, or run eagerly; a graphed key seen for the first time runs
        eagerly (its real work, and the warm-up: Triton compiles, allocator growth) and is then
        captured for the next time."""
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        run()
        if graphed:
            self.graphs[key] = self._capture(run)

    def _capture(self, run: Callable[[], None]) -> torch.cuda.CUDAGraph:
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_reserved(self.device)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            run()  # recorded, not executed: the state is untouched by the capture
        torch.cuda.synchronize(self.device)
        self.graph_pool_bytes += torch.cuda.memory_reserved(self.device) - before
        return graph
