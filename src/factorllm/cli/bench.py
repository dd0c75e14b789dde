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
    p.add_argument("--model-repeats", type=int, default=9)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--engine", default="torch", choices=["torch", "llama.cpp"],
                   help="llama.cpp: dense GGUF against MoE GGUF (pip install 'factorllm[llamacpp]')")
    p.add_argument("--gguf-type", default="q8_0", help="llama.cpp engine: weight type of both GGUFs")
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
    if args.engine == "llama.cpp":
        return run_llamacpp(args)
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


def run_llamacpp(args: argparse.Namespace) -> int:
    import copy
    import dataclasses
    import json
    import tempfile

    import torch

    from factorllm.benchmark import bench_llamacpp
    from factorllm.config import FactorConfig
    from factorllm.convert import convert_
    from factorllm.export import export
    from factorllm.loading import EMBEDDED, embedded_gguf, load_model
    from factorllm.serialization import atomic_write_text

    cfg = FactorConfig(args.experts, args.top_k, gating="softmax_renorm", router="linear_nobias")
    threads = args.threads or torch.get_num_threads()
    dense, tok = load_model(args.model)
    moe = convert_(copy.deepcopy(dense), cfg, progress=False)
    tok_gguf = str(embedded_gguf(args.model)) if args.model in EMBEDDED else None
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, model in (("dense", dense), ("moe", moe)):
            paths[name] = str(export(model, f"{tmp}/{name}.gguf", "gguf", tokenizer=tok, gguf_type=args.gguf_type,
                                     tokenizer_gguf=tok_gguf))
        r = bench_llamacpp(paths["dense"], paths["moe"], tok, args.gguf_type, threads, args.prompt_tokens,
                           args.decode_tokens, args.model_repeats)
    print(f"llama.cpp, {args.gguf_type}, {threads} threads, {args.experts} experts top-{args.top_k}, "
          f"median of {args.model_repeats} interleaved runs")
    m = r.speed
    print(f"  prefill ({m.prompt_tokens} tokens): dense {m.dense_prefill_tok_s:.0f} tok/s, moe "
          f"{m.moe_prefill_tok_s:.0f} tok/s, speed-up {m.prefill_speedup:.2f}x")
    print(f"  decode ({m.decode_tokens} tokens): dense {m.dense_decode_tok_s:.1f} tok/s, moe "
          f"{m.moe_decode_tok_s:.1f} tok/s, speed-up {m.decode_speedup:.2f}x")
    print(f"  dense text: {r.dense_text!r}\n  moe text:   {r.moe_text!r}")
    if args.json:
        atomic_write_text(args.json, json.dumps(dataclasses.asdict(r), indent=2))
    return 0
