"""`factorllm sparsify`: make a model's FFNs activation-sparse (the baseline without a router) and save it."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from factorllm.cli.common import add_model_args

    p = sub.add_parser("sparsify", help="keep each token's largest FFN inputs and neurons (activation sparsity) "
                                        "and save the model")
    add_model_args(p)
    p.add_argument("--input-keep", type=float,
                   help="share of hidden channels the gate/up projections read per token, in (0, 1] (default with "
                        "--compute: the share on a grid closest to the dense model on the calibration text)")
    keep = p.add_mutually_exclusive_group(required=True)
    keep.add_argument("--neuron-keep", type=float, help="share of neurons the down projection reads per token")
    keep.add_argument("--compute", type=float,
                      help="share of the FFN compute to run (mean over layers); the neuron share follows")
    p.add_argument("--exact-neurons", action="store_true",
                   help="the input-sparse pass only chooses the neurons; the chosen ones run on the whole input")
    p.add_argument("--dense-layers", type=int, nargs="*", default=[], help="layers whose FFN stays dense")
    p.add_argument("--chooser-steps", type=int, default=0,
                   help="with --exact-neurons: fit a learned neuron chooser for this many steps a layer on "
                        "--calib-data (about 16k tokens are enough: --calib-tokens 16384); 0: none (default)")
    p.add_argument("--calib-data", default="kjv",
                   help="text that chooses --input-keep when it is not given, and fits the chooser: kjv, "
                        "python-source, a text file, a folder of .txt, or a HF dataset (default kjv)")
    p.add_argument("--calib-tokens", type=int, default=1024, help="calibration tokens (default 1024)")
    p.add_argument("--calib-window", type=int, default=512, help="calibration sequence length (default 512)")
    p.add_argument("--seed", type=int, default=0, help="which calibration windows (default 0)")
    p.add_argument("--output", required=True, help="folder to write the sparsified model to")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from factorllm.adapters import ffns_gated, find_ffns
    from factorllm.cli.common import calibration_windows
    from factorllm.loading import load_model
    from factorllm.serialization import save
    from factorllm.sparsity import SparsityConfig, choose_input_keep, fit_chooser_, mean_recall, sparsify_

    dense_layers = tuple(args.dense_layers)
    if args.chooser_steps < 0 or (args.chooser_steps and not args.exact_neurons):
        raise ValueError(f"--chooser-steps {args.chooser_steps}: give a positive count, with --exact-neurons (the "
                         "chooser only picks neurons that then run on the whole input)")
    if args.input_keep is None and args.neuron_keep is not None:
        raise ValueError("--neuron-keep needs --input-keep; or give --compute alone, and the input share is chosen "
                         "on --calib-data")
    if args.neuron_keep is not None:  # validated before anything is loaded
        cfg = SparsityConfig(args.input_keep, args.neuron_keep, dense_layers, args.exact_neurons)
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; choose another --output or pass --overwrite")
    model, tok = load_model(args.model)
    ffns = find_ffns(model)
    gated = ffns_gated(ffns)
    calib = None
    if args.chooser_steps or (args.compute is not None and args.input_keep is None):
        calib = torch.cat(calibration_windows(tok, args))  # [B, S]
    if args.compute is not None and args.input_keep is None:
        cfg, scores = choose_input_keep(model, calib, args.compute, dense_layers, args.exact_neurons)
        losses = ", ".join(f"{keep:.2f} {loss:.4f}" for keep, loss in scores.items())
        print(f"input share: distillation loss on {calib.numel()} tokens of {args.calib_data}: {losses} -> "
              f"{cfg.input_keep:.2f}")
    elif args.compute is not None:
        cfg = SparsityConfig.for_compute(args.compute, args.input_keep, gated, dense_layers, len(ffns),
                                         args.exact_neurons)
    sparsify_(model, cfg)
    if args.chooser_steps:
        recalls = fit_chooser_(model, calib, steps=args.chooser_steps)
        before, after = mean_recall(recalls)
        print(f"learned chooser: {args.chooser_steps} steps a layer on {calib.numel()} tokens of {args.calib_data}; "
              f"the exact top neurons it keeps (held-out eighth, mean over layers) {before:.3f} -> {after:.3f}")
    model.factor_source = args.model  # the dense model: `factorllm train` uses it as the default teacher
    save(model, out, tok, overwrite=args.overwrite)
    print(f"wrote {out} (input keep {cfg.input_keep:.3f}, neuron keep {cfg.neuron_keep:.3f}: "
          f"{cfg.mean_compute(len(ffns), gated):.1%} of the FFN compute over {len(ffns)} layers)")
    return 0
