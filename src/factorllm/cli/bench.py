"""`factorllm bench`: wall-clock FFN-layer and whole-model timings, dense against MoE, in one process."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time dense against MoE: the FFN layer and the whole model")
    p.add_argument("--model", default="smollm2-135m", help="model for the whole-model timings ('none' to skip)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--shapes", default="576x1536,2048x5632", help="FFN shapes hidden x ffn, comma-separated")
    p.add_argument("--tokens", default="1,512", help="token counts of the FFN benchmark, comma-separated")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--model-repeats", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="write the results to this JSON file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from factorllm.benchmark import BenchConfig, format_result, run_bench
    from factorllm.serialization import atomic_write_text

    try:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
        tokens = tuple(int(t) for t in args.tokens.split(","))
    except ValueError as err:
        raise ValueError(f"--shapes takes 'HIDDENxFFN,...' and --tokens 'N,...' ({err})") from err
    cfg = BenchConfig(
        num_experts=args.experts, top_k=args.top_k, shapes=shapes, tokens=tokens, repeats=args.repeats,
        device=args.device, dtype=args.dtype, threads=args.threads,
        model=None if args.model == "none" else args.model, prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens, model_repeats=args.model_repeats,
    )
    result = run_bench(cfg, progress=lambda s: print(f"timing {s} ...", file=sys.stderr, flush=True))
    print(format_result(result))
    if args.json:
        data = result.to_dict()
        if result.model is not None:  # flat keys for scripts that read only the headline numbers
            data["decode_speedup"] = result.model.decode_speedup
            data["prefill_speedup"] = result.model.prefill_speedup
        atomic_write_text(args.json, json.dumps(data, indent=2))
    return 0
