"""The one benchmark harness: settings, timing, the copy-bandwidth ceiling, the environment
record, markdown tables, JSON and charts. Every script in benchmarks/ times through `time_fn`.

Timing method (see /work/.library/device/METHOD.md and the spec's conventions):
- On a GPU, `triton.testing.do_bench` times each call between CUDA events and we report the
  median (with the 20th/80th percentiles as the spread). The function runs untimed first and
  is warmed up for `warmup_ms`, so JIT compilation, autotuning and allocator growth stay out
  of the numbers; calls are timed for `rep_ms` (100 ms), or at least ~20 calls of a long region.
- L2 is flushed before every timed call: do_bench zeroes a 256 MB buffer (5x the H100's 50 MB
  L2) between calls, so each call reads its weights and inputs from HBM, as decode does.
- Regions made of many small launches are captured in a CUDA graph (`graph=True`) and the
  replays are timed, as the runtime replays them; a region that cannot be captured is timed
  eagerly and says so in its `note`.
- On a CPU (the smoke mode only) a host clock times a few calls: those numbers prove the
  plumbing and are never a measurement.

Nothing in this module imports a Triton kernel module: callers decide first whether Triton
runs through its CPU interpreter (`prepare_interpreter`).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
SMOKE_BANNER = ("SMOKE RUN: plumbing check on a tiny geometry with few iterations. "
                "NOT A MEASUREMENT: do not quote, compare or commit these numbers.")


# -- settings ---------------------------------------------------------------------------------
@dataclass
class Settings:
    """What one run measures and how hard it tries. `smoke()` shrinks everything for CI."""

    device: str = "cuda"
    smoke: bool = False
    quick: bool = False
    geometry: str = "7b"  # vita_kernels.registry.GEOMETRIES key: op cases and step row counts
    preset: str = "7b"  # vita_audio_runtime preset for the MCTP step and end-to-end runs
    dtype: str = "bf16"
    backend: str = "auto"
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    compile: bool = True  # torch.compile peers
    compile_mode: str = "max-autotune"  # for the MCTP step peer; per-op peers use the default mode
    prompt_len: int = 32
    new_tokens: int = 256
    repeats: int = 3  # measured generations per mode (after one warm-up generation)
    max_seq_len: int = 512
    seed: int = 0
    host_min_calls: int = 3  # timed calls per region at least, on the host clock (CPU smoke)
    deadline: float | None = field(default=None, repr=False)  # time.monotonic(); optional work stops after

    @classmethod
    def smoke_settings(cls, device: str = "cpu") -> Settings:
        return cls(device=device, smoke=True, geometry="tiny", preset="tiny", dtype="fp32", warmup_ms=1.0,
                   rep_ms=4.0, compile=False, new_tokens=24, repeats=1, max_seq_len=128, host_min_calls=2)

    def quicken(self) -> None:
        """--quick: fewer repetitions, shorter generations, torch.compile peers only where cheap."""
        self.quick = True
        self.warmup_ms, self.rep_ms = min(self.warmup_ms, 10.0), min(self.rep_ms, 40.0)
        self.repeats, self.new_tokens = 1, min(self.new_tokens, 128)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]

    def time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def record(self) -> dict:
        d = asdict(self)
        d.pop("deadline")
        d["time_budget_left_s"] = None if self.deadline is None else round(self.time_left(), 1)
        return d


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cuda:N (default: cuda; the CPU only with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny geometry, few iterations, no torch.compile: proves the plumbing, measures nothing")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and shorter generations")
    parser.add_argument("--backend", default="auto", help="kernel backend of our engine: auto | triton | cuda | torch")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    parser.add_argument("--compile-mode", default="max-autotune",
                        help="torch.compile mode of the MCTP-step peer (default max-autotune)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per end-to-end generation (256)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="stop starting optional work (torch.compile peers) once this much time has passed")
    parser.add_argument("--seed", type=int, default=0)


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.smoke:
        s = Settings.smoke_settings(args.device or "cpu")
    else:
        if args.device is not None and not args.device.startswith("cuda"):
            raise SystemExit(f"--device {args.device}: measurements need a CUDA device; use --smoke on a CPU")
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device here: the benchmarks measure a GPU. Use --smoke to check the "
                             "plumbing on a CPU (its numbers are not a measurement)")
        s = Settings(device=args.device or "cuda")
    if args.quick:
        s.quicken()
    s.backend, s.seed = args.backend, args.seed
    s.compile = s.compile and not args.no_compile
    s.compile_mode = args.compile_mode
    if args.new_tokens is not None:
        s.new_tokens = args.new_tokens
    if args.time_budget_s is not None:
        s.deadline = time.monotonic() + args.time_budget_s
    return s


def prepare_interpreter(settings: Settings) -> None:
    """On a CPU, run Triton kernels through the interpreter; must precede any kernel import."""
    if settings.torch_device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


# -- timing -----------------------------------------------------------------------------------
@dataclass
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    graphed: bool = False  # the timed calls were CUDA-graph replays
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def capture_graph(fn: Callable[[], Any], warmup_calls: int = 2) -> torch.cuda.CUDAGraph:
    """fn recorded into a CUDA graph after warm-up calls on a side stream (JIT, allocator growth)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def time_fn(fn: Callable[[], Any], settings: Settings, graph: bool = False) -> Timing:
    """Median time of fn() (see the module docstring); graph=True times CUDA-graph replays."""
    if settings.torch_device.type != "cuda":
        return _time_host(fn, settings)
    import triton.testing

    target, note, captured = fn, "", None
    if graph:
        try:
            captured = capture_graph(fn)
            target = captured.replay
        except Exception as exc:  # noqa: BLE001 - record why and time the region eagerly
            torch.cuda.synchronize()
            note = f"not graph-capturable ({_first_line(exc)}); timed eagerly"
    # At least ~20 timed calls for long regions (a 30 ms eager burst), at most 2 s of them.
    target()
    torch.cuda.synchronize()
    start = time.perf_counter()
    target()
    torch.cuda.synchronize()
    rep_ms = max(settings.rep_ms, min(20e3 * (time.perf_counter() - start), 2000.0))
    q = triton.testing.do_bench(target, warmup=settings.warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(q[0] * 1e3, q[1] * 1e3, q[2] * 1e3, graphed=captured is not None, note=note)


def _time_host(fn: Callable[[], Any], settings: Settings) -> Timing:
    """Smoke mode on a CPU: a host clock around a handful of calls."""
    start = time.perf_counter()
    fn()  # the first call (allocations, interpreter set-up) only sizes the loop
    first = max(time.perf_counter() - start, 1e-7)
    for _ in range(int(settings.warmup_ms * 1e-3 / first)):
        fn()
    times = []
    for _ in range(min(1000, max(settings.host_min_calls, int(settings.rep_ms * 1e-3 / first)))):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), q[1], q[7], note="host clock (CPU smoke)")


def copy_bandwidth(settings: Settings) -> dict:
    """The measured memory ceiling: a large device-to-device copy, bytes read + bytes written.

    1 GiB each way on a GPU (20x the L2, so the copy streams from HBM); random data, never zeros.
    """
    dev = settings.torch_device
    nbytes = (1 << 30) if dev.type == "cuda" else (32 << 20)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), settings)
    moved = 2 * nbytes
    return {"bytes_read_plus_written": moved, **t.as_dict(), "gbps": moved / (t.median_us * 1e-6) / 1e9}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def roofline(bytes_moved: int | None, us: float | None, copy_gbps: float) -> dict:
    """GB/s achieved, the floor (bytes / measured copy bandwidth) and the fraction of it reached."""
    if not bytes_moved or not us:
        return {"gbps": None, "floor_us": None, "pct_copy_bw": None}
    gbps = bytes_moved / (us * 1e-6) / 1e9
    return {"gbps": gbps, "floor_us": bytes_moved / (copy_gbps * 1e9) * 1e6, "pct_copy_bw": 100.0 * gbps / copy_gbps}


# -- the environment record -------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(list(cmd), cwd=REPO, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment(settings: Settings) -> dict:
    """What produced the numbers: device, library versions, the code's commit, the date (UTC)."""
    import vita_kernels
    from vita_kernels.backend import cuda_extension

    commit = _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain"]) if commit else None
    env: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "vita_kernels": vita_kernels.__version__,
        "cuda_extension_built": cuda_extension() is not None,
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "device": str(settings.torch_device),
        "gpu": None,
    }
    if settings.torch_device.type == "cuda":
        props = torch.cuda.get_device_properties(settings.torch_device)
        env["gpu"] = {
            "name": props.name, "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_bytes": getattr(props, "L2_cache_size", None),
            "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        }
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def device_name(env: dict) -> str:
    return env["gpu"]["name"] if env.get("gpu") else f"cpu ({env.get('cpu', '')})"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# -- the engine the runtime benchmarks share --------------------------------------------------
def load_engine(settings: Settings, cuda_graphs: bool | None = None):
    """Our engine on the preset (random weights made on the device), and how long that took."""
    from vita_audio_runtime.engine import Engine

    start = time.perf_counter()
    engine = Engine.from_pretrained(settings.preset, device=settings.device, dtype=settings.dtype,
                                    backend=settings.backend, max_seq_len=settings.max_seq_len,
                                    cuda_graphs=cuda_graphs, seed=settings.seed)
    sync(settings.device)
    return engine, time.perf_counter() - start


def prompt_ids(engine, length: int, seed: int) -> list[int]:
    """A seeded random prompt of text ids (below the first special id), as the CLI makes one."""
    n_text = min(engine.special.eos_ids) if engine.special.eos_ids else engine.cfg.vocab_size
    return torch.randint(0, n_text, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def size_text(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3g} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.3g} MB"


# -- output -----------------------------------------------------------------------------------
# A column: (header, row key, format spec or callable). None renders as "n/a".
Column = tuple[str, str, "str | Callable[[Any], str]"]


def fmt(value: Any, spec: str | Callable[[Any], str] = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if callable(spec):
        return spec(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec) if spec else str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    header = "| " + " | ".join(h for h, _, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k), f).replace("|", "/") for _, k, f in columns) + " |" for r in rows]
    return "\n".join([header, rule, *body])


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    tmp.replace(path)  # never leave a half-written file behind a timeout
    return path


def write_results(out: Path, record: dict, title: str, machine: str, rows: Sequence[dict],
                  columns: Sequence[Column]) -> str:
    """results.json (the record) and results.md (title, machine, versions, commit, date, table)
    into `out`; returns the markdown."""
    env = record["environment"]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", record)
    text = (f"### {title}\n\n{machine}, torch {env['torch']}, commit {env['git_commit']}"
            f"{' (dirty)' if env['git_dirty'] else ''}, {env['date_utc']}\n\n" + markdown_table(rows, columns) + "\n")
    (out / "results.md").write_text(text)
    return text


def plot_against_floor(panels: Sequence[dict], path: Path, title: str) -> tuple[Path | None, str]:
    """One bar chart per panel: median µs per case and implementation, the floor as a black bar.

    A panel: {"title", "labels": [case], "series": {impl: [µs or None per case]},
    "floor_us": [µs or None per case]}. Returns (path or None, why not).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return None, (f"matplotlib is not installed ({exc}); install the `bench` extra and re-render with "
                      "python -m benchmarks.run_all --render DIR")
    panels = [p for p in panels if p["labels"]]
    if not panels:
        return None, "nothing to plot"
    cols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(7.5 * cols, 3.8 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        labels, names = panel["labels"], list(panel["series"])
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            values = [math.nan if v is None else v for v in panel["series"][name]]
            xs = [x + (i - (len(names) - 1) / 2) * width for x in range(len(labels))]
            ax.bar(xs, values, width, label=name)
        floor_label = "floor: bytes / copy BW"
        for x, floor in enumerate(panel["floor_us"]):
            if floor:
                ax.hlines(floor, x - 0.45, x + 0.45, colors="black", linewidth=2.5, label=floor_label)
                floor_label = None
        ax.set_yscale("log")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("median µs (log)")
        ax.set_title(panel["title"], fontsize=10)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, ""


def standalone(name: str, run: Callable[..., dict], render: Callable[[dict], str], argv: list[str] | None,
               extra_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """`python -m benchmarks.<script>`: one section with its own copy-bandwidth measurement, printed."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}")
    add_common_args(parser)
    if extra_args:
        extra_args(parser)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    prepare_interpreter(settings)
    copy = copy_bandwidth(settings)
    section = run(settings, copy["gbps"], args=args)
    if settings.smoke:
        print(SMOKE_BANNER)
    print(f"copy bandwidth {copy['gbps']:.0f} GB/s on {settings.device}\n")
    print(render(section))
    return 0
