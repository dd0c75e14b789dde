"""`factorllm run`: convert, train, evaluate, benchmark and report, resumably, into one folder."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="dense model -> factorized, trained, evaluated, timed; report.md and plots")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", default="2,4", help="comma-separated k values (default 2,4)")
    p.add_argument("--partition", default="importance")
    p.add_argument("--gating", default="sum")
    p.add_argument("--preset", default="default", choices=["quick", "default"],
                   help="quick: under 5 minutes on 2 CPU cores; default: under 45")
    p.add_argument("--router-steps", type=int)
    p.add_argument("--expert-steps", type=int)
    p.add_argument("--output", required=True, help="run folder; run again with the same folder to resume")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from factorllm.pipeline import run as run_pipeline
    from factorllm.pipeline import run_config

    cfg = run_config(args.preset, model=args.model, experts=args.experts,
                     top_ks=tuple(int(k) for k in args.top_k.split(",")), partition=args.partition,
                     gating=args.gating, router_steps=args.router_steps, expert_steps=args.expert_steps)
    run_pipeline(cfg, args.output)
    return 0
