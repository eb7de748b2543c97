"""The step runner: executes LLM steps and MCTP bursts eagerly or as CUDA-graph replays."""
from __future__ import annotations

from typing import Callable

import torch

from vita_audio_runtime.model import DecodeState, VitaModel, Workspace
from vita_kernels.sampling import SamplingParams


class DecodeRunner:
    """Owns the static decode state, the per-row-count workspaces and the captured graphs.

    Invariants:
    - batch size 1 and max_seq_len are fixed for the runner's life; every buffer (KV cache,
      hidden history, token buffer, workspaces) keeps its address, so a graph stays valid;
    - between replays only device memory contents change: positions are staged through the
      `positions` tensor (module k's first row in slot k, the LLM's in slot N), tokens through
      the state's token buffer; the sampling parameters are part of a graph's key;
    - one graph per distinct step shape: an LLM step of R rows, or a burst whose module k
      processes R_k rows, for R <= `graph_max_rows`. Longer steps (the prompt prefill, a module's
      catch-up over the whole history) run eagerly;
    - inside a step nothing synchronises with the host; the host reads new tokens once per step
      (one LLM step or one whole burst), which also orders the next position upload after it;
    - after a shape's graph is captured, replays allocate nothing.
    On a CPU (or with use_graphs=False) the same code runs eagerly, step for step.
    """

    def __init__(self, model: VitaModel, max_seq_len: int, use_graphs: bool, graph_max_rows: int = 16):
        cfg = model.cfg
        self.model, self.max_seq_len = model, max_seq_len
        self.device, self.dtype = model.device, model.dtype
        self.use_graphs = bool(use_graphs and self.device.type == "cuda")
        self.graph_max_rows = graph_max_rows
        self.state = DecodeState(cfg, max_seq_len, self.device, self.dtype)
        self.positions = torch.zeros(cfg.num_mtp_modules + 1, dtype=torch.int64, device=self.device)
        self._positions_host = torch.zeros_like(self.positions, device="cpu",
                                                pin_memory=self.device.type == "cuda")
        self.workspaces: dict[int, Workspace] = {}
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.graph_pool_bytes = 0
        self._pool = None
        self.generator = torch.Generator(device=self.device)

    # -- buffers -----------------------------------------------------------------------------
    def workspace(self, rows: int) -> Workspace:
        """Buffers for a step of `rows` rows: kept for graphable sizes (their addresses are baked
        into graphs), made afresh for the longer eager steps, so prompts of many lengths do not
        accumulate buffers."""
        if rows > self.graph_max_rows:
            return Workspace(self.model.cfg, rows, self.device, self.dtype)
        if rows not in self.workspaces:
            self.workspaces[rows] = Workspace(self.model.cfg, rows, self.device, self.dtype)
        return self.workspaces[rows]

    def memory_report(self) -> dict[str, int]:
        """Bytes held on the device: weights, KV cache, other state, workspaces, graph pool."""
        return {"weights": self.model.weight_bytes, "kv_cache": self.state.kv_cache_bytes,
                "state_other": self.state.bytes - self.state.kv_cache_bytes,
                "workspaces": sum(ws.bytes for ws in self.workspaces.values()),
                "graph_pool": self.graph_pool_bytes}

    def reset(self, prompt: list[int], seed: int) -> None:
        """Start a generation: the prompt into the token buffer and the seen-id mask."""
        st = self.state
        ids = torch.tensor(prompt, dtype=torch.int64).to(self.device)
        st.tokens[: len(prompt)].copy_(ids)
        st.seen.zero_()
        st.seen.index_fill_(0, ids, True)
        self.generator.manual_seed(seed)

    def read_tokens(self, start: int, count: int) -> list[int]:
        """The host's one read per step: `count` ids from the token buffer (synchronises)."""
        return self.state.tokens[start:start + count].tolist()

    # -- steps -------------------------------------------------------------------------------
    def _upload_positions(self, values: dict[int, int]) -> None:
        for slot, value in values.items():
            self._positions_host[slot] = value
        self.positions.copy_(self._positions_host, non_blocking=True)

    def _graphed(self, max_rows: int, params: SamplingParams) -> bool:
        """Whether a step runs as a graph: on a GPU with graphs on, up to graph_max_rows rows,
        and for a sampling step only where torch lets a graph register the runner's generator."""
        return (self.use_graphs and max_rows <= self.graph_max_rows
                and (not params.do_sample or hasattr(torch.cuda.CUDAGraph, "register_generator_state")))

    def _kv_bound(self, graphed: bool, length: int) -> int:
        """Cache slots attention may read: the exact length in an eager step; the whole cache in
        a graphed step, which must not bake in one step's length."""
        return self.max_seq_len if graphed else length

    def llm_step(self, first_row: int, rows: int, params: SamplingParams) -> None:
        """LLM over rows first_row..first_row+rows-1; its next token lands at first_row + rows."""
        n = self.model.cfg.num_mtp_modules
        self._upload_positions({n: first_row})
        ws, pos = self.workspace(rows), self.positions[n:n + 1]
        graphed = self._graphed(rows, params)
        bound = self._kv_bound(graphed, first_row + rows)

        def run() -> None:
            self.model.llm_step(self.state, ws, pos, bound)
            self.model.emit(self.state, ws, pos, 0, params, self.generator)

        self._execute(("llm", rows, params), graphed, run)

    def burst(self, spans: list[tuple[int, int]], params: SamplingParams) -> None:
        """Modules 0..B-1 in one go: module k over spans[k] = (first_row, rows), each emitting."""
        self._upload_positions(dict(enumerate(first for first, _ in spans)))
        shape = tuple(rows for _, rows in spans)
        graphed = self._graphed(max(shape), params)
        work = [(k, self.workspace(rows), self.positions[k:k + 1], self._kv_bound(graphed, first + rows))
                for k, (first, rows) in enumerate(spans)]

        def run() -> None:
            for k, ws, pos, bound in work:
                self.model.mtp_step(k, self.state, ws, pos, bound)
                self.model.emit(self.state, ws, pos, k + 1, params, self.generator)

        self._execute(("burst", shape, params), graphed, run)

    def _execute(self, key: tuple, graphed: bool, run: Callable[[], None]) -> None:
        """Replay the key's graph, or run eagerly; a graphed shape seen for the first time runs
        eagerly (its real work, and the warm-up: Triton compiles, allocator growth) and is then
        captured for the next time."""
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        run()
        if graphed:
            self.graphs[key] = self._capture(run, samples=key[-1].do_sample)

    def _capture(self, run: Callable[[], None], samples: bool) -> torch.cuda.CUDAGraph:
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_reserved(self.device)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        if samples:
            graph.register_generator_state(self.generator)
        with torch.cuda.graph(graph, pool=self._pool):
            run()  # recorded, not executed: the state is untouched by the capture
        torch.cuda.synchronize(self.device)
        self.graph_pool_bytes += torch.cuda.memory_reserved(self.device) - before
        return graph
