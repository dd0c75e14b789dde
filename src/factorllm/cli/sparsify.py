"""`factorllm sparsify`: make a model's FFNs activation-sparse (the baseline without a router) and save it."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from factorllm.cli.common import add_model_args

    p = sub.add_parser("sparsify", help="keep each token's largest FFN inputs and neurons (activation sparsity) "
                                        "and save the model")
    add_model_args(p)
    p.add_argument("--input-keep", type=float, required=True,
                   help="share of hidden channels the gate/up projections read per token, in (0, 1]")
    keep = p.add_mutually_exclusive_group(required=True)
    keep.add_argument("--neuron-keep", type=float, help="share of neurons the down projection reads per token")
    keep.add_argument("--compute", type=float,
                      help="share of the FFN compute to run (mean over layers); the neuron share follows")
    p.add_argument("--exact-neurons", action="store_true",
                   help="the input-sparse pass only chooses the neurons; the chosen ones run on the whole input")
    p.add_argument("--dense-layers", type=int, nargs="*", default=[], help="layers whose FFN stays dense")
    p.add_argument("--output", required=True, help="folder to write the sparsified model to")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from factorllm.adapters import adapter_for, find_ffns
    from factorllm.loading import load_model
    from factorllm.serialization import save
    from factorllm.sparsity import SparsityConfig, sparsify_

    dense_layers = tuple(args.dense_layers)
    if args.neuron_keep is not None:  # validated before anything is loaded
        cfg = SparsityConfig(args.input_keep, args.neuron_keep, dense_layers, args.exact_neurons)
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; choose another --output or pass --overwrite")
    model, tok = load_model(args.model)
    ffns = find_ffns(model)
    gated = adapter_for(ffns[0][1]).read(ffns[0][1]).gated
    if args.compute is not None:
        cfg = SparsityConfig.for_compute(args.compute, args.input_keep, gated, dense_layers, len(ffns),
                                         args.exact_neurons)
    sparsify_(model, cfg)
    model.factor_source = args.model  # the dense model: `factorllm train` uses it as the default teacher
    save(model, out, tok, overwrite=args.overwrite)
    print(f"wrote {out} (input keep {cfg.input_keep:.3f}, neuron keep {cfg.neuron_keep:.3f}: "
          f"{cfg.mean_compute(len(ffns), gated):.1%} of the FFN compute over {len(ffns)} layers)")
    return 0
