"""`factorllm convert`: factorize a model's FFNs and save the result."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from factorllm.cli.common import add_factor_args, add_model_args

    p = sub.add_parser("convert", help="split every FFN into experts and save the MoE model")
    add_model_args(p)
    add_factor_args(p)
    p.add_argument("--output", required=True, help="folder to write the factorized model to")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from factorllm.cli.common import calibration_windows, factor_config_from_args
    from factorllm.convert import convert_
    from factorllm.loading import load_model
    from factorllm.partition import PARTITIONS
    from factorllm.serialization import save

    cfg = factor_config_from_args(args)  # validates before anything is loaded
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; choose another --output or pass --overwrite")
    model, tok = load_model(args.model)
    needs_calib = PARTITIONS.get(cfg.partition).needs_calibration or cfg.shared_neurons > 0
    calib = calibration_windows(tok, args) if needs_calib else None
    convert_(model, cfg, calib=calib)
    model.factor_source = args.model  # the dense model: `factorllm train` uses it as the default teacher
    save(model, out, tok, overwrite=args.overwrite)
    print(f"wrote {out} ({cfg.num_experts} experts, top-{cfg.top_k}, partition {cfg.partition})")
    return 0
