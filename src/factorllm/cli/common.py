"""Arguments shared by subcommands, and their translation into configs."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="hub id, local folder, .gguf file, or an embedded model name (default: smollm2-135m)")


def add_factor_args(p: argparse.ArgumentParser) -> None:
    from factorllm.partition import PARTITIONS
    from factorllm.router import GATINGS, ROUTERS

    p.add_argument("--experts", type=int, default=8, help="routed experts per layer (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--partition", default="coactivation", choices=PARTITIONS.names())
    p.add_argument("--gating", default="hard", choices=GATINGS.names())
    p.add_argument("--router", default="linear", choices=ROUTERS.names())
    p.add_argument("--shared-neurons", type=int, default=0, help="always-on shared expert width (default 0)")
    p.add_argument("--dense-layers", type=int, nargs="*", default=[],
                   help="0-based layers whose FFN stays dense (e.g. --dense-layers 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-data", default="kjv",
                   help="calibration text: kjv, kjv-heldout, pydoc, a text file, a folder of .txt, or a HF dataset")
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--calib-window", type=int, default=512, help="calibration sequence length (default 512)")


def factor_config_from_args(args: argparse.Namespace):
    from factorllm.config import FactorConfig

    return FactorConfig(
        num_experts=args.experts, top_k=args.top_k, partition=args.partition, gating=args.gating,
        router=args.router, shared_neurons=args.shared_neurons, seed=args.seed, dense_layers=tuple(args.dense_layers),
    )


def calibration_windows(tokenizer, args: argparse.Namespace):
    """`--calib-tokens` tokens of `--calib-data`, as random windows of `--calib-window` tokens."""
    from factorllm.data import load_text, tokenize, windows

    if args.calib_tokens < 1:
        raise ValueError(f"--calib-tokens={args.calib_tokens} must be >= 1")
    window = min(args.calib_window, args.calib_tokens)
    ids = tokenize(tokenizer, load_text(args.calib_data))
    count = max(1, args.calib_tokens // window)
    return list(windows(ids, window, count=count, seed=args.seed).split(4))  # batches of [<=4, window]
