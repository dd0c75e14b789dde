"""`factorllm eval`: perplexity, cloze and fixture-task accuracy (and routing statistics) of a dense or
factorized model."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a dense or factorized model")
    p.add_argument("--model", required=True,
                   help="factorllm folder, transformers folder, .gguf, hub id or smollm2-135m")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows per domain")
    p.add_argument("--cloze", type=int, default=64, help="cloze items per domain (0: skip)")
    p.add_argument("--tasks", default="all", help="comma-separated fixture tasks, 'all', or 'none'")
    p.add_argument("--task-limit", type=int, default=None)
    p.add_argument("--scorer", default="own", choices=["own", "harness"])
    p.add_argument("--json", help="write the results to this JSON file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from factorllm.evaluate import evaluate_model
    from factorllm.loading import load_model
    from factorllm.serialization import atomic_write_text

    tasks = None if args.tasks == "all" else [] if args.tasks == "none" else args.tasks.split(",")
    model, tok = load_model(args.model)
    res = evaluate_model(model, tok, window=args.window, eval_windows=args.eval_windows, cloze=args.cloze,
                         tasks=tasks, task_limit=args.task_limit, scorer=args.scorer)
    print("ppl: " + ", ".join(f"{d} {v:.2f}" for d, v in res["ppl"].items()))
    if res["cloze"]:
        print("cloze accuracy: " + ", ".join(f"{d} {v:.3f}" for d, v in res["cloze"].items()))
    if res["accuracy"]:
        print("task accuracy: " + ", ".join(f"{t} {v:.3f}" for t, v in res["accuracy"].items()))
    for r in res.get("routing", []):
        print(f"{r['layer']}: entropy {r['entropy']:.2f}/{r['max_entropy']:.2f}, oracle agreement "
              f"{r['oracle_agreement']:.2f}, chunk sparsity {r['chunk_sparsity']:.2f}, "
              f"norm ratio {r['output_norm_ratio']:.2f}")
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2))
    return 0
