"""`vita-audio`: generate on a checkpoint or a built-in preset; `bench` runs the GPU suite."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vita-audio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate tokens in one of the four modes")
    g.add_argument("--model", default="small", help="checkpoint directory, or a preset: tiny, small, 7b")
    g.add_argument("--mode", help="vanilla | balance | boost | turbo | a list like 1,10,4,10 "
                                  "(default: the checkpoint's mtp_inference_mode; Boost for presets)")
    prompt = g.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="a text prompt: one user turn in the chat format (needs the checkpoint's "
                                         "tokenizer files; presets carry their own)")
    prompt.add_argument("--prompt-ids", type=_ids, help="comma-separated prompt token ids")
    prompt.add_argument("--prompt-len", type=int, help="a random prompt of this many text ids (seeded)")
    g.add_argument("--system", help="a system message before the --prompt turn")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--greedy", action="store_true", help="greedy decoding (overrides generation_config)")
    g.add_argument("--temperature", type=float, help="sample with this temperature (implies sampling)")
    g.add_argument("--top-k", type=int, help="sample from the k most likely ids (implies sampling; 0: off)")
    g.add_argument("--top-p", type=float, help="nucleus sampling threshold (implies sampling)")
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--dtype", help="fp32 | bf16 | fp16 (default: the checkpoint's or preset's)")
    g.add_argument("--backend", default="auto", help="auto | triton | cuda | torch")
    g.add_argument("--seed", type=int, default=0, help="seeds sampling and the random --prompt-len prompt")
    g.add_argument("--weights-seed", type=int, default=0, help="seeds a preset's random weights")
    g.add_argument("--max-seq-len", type=int)
    g.add_argument("--no-cuda-graphs", action="store_true", help="run every step eagerly on a GPU")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    s = sub.add_parser("serve", help="serve generation over HTTP and WebSocket (needs the serve extra)")
    s.add_argument("--model", default="small", help="checkpoint directory, or a preset: tiny, small, 7b")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503s")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest accepted request body")
    s.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    s.add_argument("--dtype", help="fp32 | bf16 | fp16 (default: the checkpoint's or preset's)")
    s.add_argument("--backend", default="auto", help="auto | triton | cuda | torch")
    s.add_argument("--max-seq-len", type=int)
    s.add_argument("--log-level", default="info")
    b = sub.add_parser("bench", help="the GPU benchmark suite (needs a CUDA device)")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for benchmarks/run_all.py")
    return parser


def _generate(args) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.backend == "triton" and device.startswith("cpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on a CPU: before any kernel is defined
    from vita_audio_runtime.engine import Engine
    from vita_audio_runtime.schedule import Mode

    if args.mode is not None:
        Mode.parse(args.mode)  # a bad mode fails before the model is built
    sampling_flags = [f for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                     ("--top-p", args.top_p)) if v is not None]
    if args.greedy and sampling_flags:
        raise ValueError(f"--greedy cannot be combined with {', '.join(sampling_flags)}")
    # --greedy forces greedy decoding, a sampling flag forces sampling, neither keeps the checkpoint's choice.
    do_sample = False if args.greedy else (True if sampling_flags else None)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prompt_len is not None and args.prompt_len < 1:
        raise ValueError(f"--prompt-len must be >= 1, got {args.prompt_len}")
    if args.system is not None and args.prompt is None:
        raise ValueError("--system needs a text --prompt")
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                                    max_seq_len=args.max_seq_len, cuda_graphs=False if args.no_cuda_graphs else None,
                                    seed=args.weights_seed)
    tokenizer = _tokenizer(args.model, required=args.prompt is not None)
    if args.prompt is not None:
        prompt = tokenizer.chat_prompt_ids(args.prompt, system=args.system)
    elif args.prompt_ids is not None:
        prompt = args.prompt_ids
    else:
        n_text = min(engine.special.eos_ids) if engine.special.eos_ids else engine.cfg.vocab_size
        gen = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(0, n_text, (args.prompt_len or 32,), generator=gen).tolist()
    mode = engine.mode(args.mode)
    result = engine.generate(prompt, mode=mode, max_new_tokens=args.max_new_tokens,
                             do_sample=do_sample, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                             seed=args.seed, ignore_eos=args.ignore_eos)
    text = None if tokenizer is None else tokenizer.decode(result.tokens)
    if args.json:
        print(json.dumps({
            "model": str(args.model), "mode": list(mode), "device": str(engine.model.device),
            "dtype": str(engine.model.dtype).replace("torch.", ""), "backend": engine.kernels.choice,
            "prompt": prompt, "tokens": result.tokens, "producers": result.producer_names, "text": text,
            "stop_reason": result.stop_reason, "timings": result.timings,
            "audio_chunks": [{"codes": c.codes, "complete": c.complete} for c in result.audio_chunks],
            "memory_bytes": engine.memory_report(),
        }))
        return 0
    print(f"model {args.model} on {engine.model.device} ({str(engine.model.dtype).replace('torch.', '')}), "
          f"backend {engine.kernels.name}, mode {args.mode or 'default'} {list(mode)}, prompt {len(prompt)} tokens")
    line = []
    for token, producer in zip(result.tokens, result.producer_names):
        line.append(f"{token}[{producer}]")
    print("tokens:", " ".join(line))
    print("text:", "(no tokenizer files)" if text is None else repr(text))
    counts = {}
    for p in result.producer_names:
        key = "llm" if p == "llm" else "mtp"
        counts[key] = counts.get(key, 0) + 1
    print(f"produced: {counts.get('llm', 0)} by the LLM, {counts.get('mtp', 0)} by MCTP modules; "
          f"stop: {result.stop_reason}")
    for i, chunk in enumerate(result.audio_chunks):
        state = "" if chunk.complete else " (incomplete)"
        print(f"audio chunk {i}{state}: {len(chunk.codes)} codes {chunk.codes}")
    if not result.audio_chunks:
        print("audio chunks: none (random weights rarely emit begin/end-of-audio pairs)")
    t = result.timings
    fmt = lambda v: "n/a" if v is None else f"{v * 1e3:.1f} ms"  # noqa: E731
    print(f"time to first token {fmt(t['ttft_s'])}, to first {1 + engine.cfg.num_mtp_modules} tokens "
          f"{fmt(t['first_chunk_s'])}, to first audio chunk {fmt(t['first_audio_chunk_s'])}; "
          f"{t['tokens_per_s']:.1f} tokens/s over {len(result.tokens)} tokens")
    return 0


def _tokenizer(model: str, required: bool):
    """The checkpoint's (or preset's) tokenizer; None when it has no tokenizer files and none is required."""
    from vita_audio_runtime.tokenizer import TextTokenizer, TokenizerMissingError

    try:
        return TextTokenizer.from_pretrained(model)
    except TokenizerMissingError:
        if required:
            raise
        return None


def _serve(args) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"vita-audio serve needs the serve extra ({e.name} is not installed): "
              'pip install -e ".[serve]"', file=sys.stderr)
        return 2
    for name, value, low in (("--port", args.port, 0), ("--max-batch", args.max_batch, 1),
                             ("--max-queue", args.max_queue, 0), ("--max-body-bytes", args.max_body_bytes, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.backend == "triton" and device.startswith("cpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from vita_audio_runtime.engine import Engine
    from vita_audio_runtime.server import build_server
    from vita_audio_runtime.tokenizer import TokenizerMissingError

    try:
        tokenizer, tokenizer_error = _tokenizer(args.model, required=True), None
    except TokenizerMissingError as e:  # ids still work; text prompts get a 400 that says why
        tokenizer, tokenizer_error = None, str(e)
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                                    max_seq_len=args.max_seq_len, max_batch=args.max_batch, max_queue=args.max_queue)
    try:
        build_server(engine, tokenizer, host=args.host, port=args.port, model_name=str(args.model),
                     max_body_bytes=args.max_body_bytes, log_level=args.log_level,
                     tokenizer_error=tokenizer_error).run()
    finally:
        engine.close()
    return 0


def _bench(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("vita-audio bench needs a CUDA GPU (it times kernels against the device's memory bandwidth); "
              "none is available here. On a CPU, run the CPU benchmarks: pytest benchmarks/ --benchmark-enable",
              file=sys.stderr)
        return 2
    from benchmarks import run_all

    return run_all.main(args.args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vita_audio_runtime.config import CheckpointError  # imports no kernel module

    try:
        return {"generate": _generate, "serve": _serve, "bench": _bench}[args.command](args)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
