"""`factorllm train`: train a factorized model's routers (PA loss) and/or experts, then save it."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train routers and/or experts of a factorized model")
    p.add_argument("--model", required=True, help="a folder written by `factorllm convert`")
    p.add_argument("--teacher", help="the dense model (default: the one the folder was converted from)")
    p.add_argument("--data", default="kjv", help="corpus name (kjv, python-source, pydoc; several joined by '+', "
                   "interleaved), text file, folder of .txt, or HF dataset")
    p.add_argument("--text-column", default="text")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--tokens", type=int, default=65536, help="training tokens to read (default 65536)")
    p.add_argument("--heldout-windows", type=int, default=2)
    p.add_argument("--mode", default="layerwise", choices=["layerwise", "end2end"])
    p.add_argument("--train", default="router", choices=["router", "experts", "both"])
    p.add_argument("--pseudo-label", default="norm")
    p.add_argument("--pa-weight", type=float, default=1.0)
    p.add_argument("--bce-weight", type=float, default=0.0)
    p.add_argument("--switch-weight", type=float, default=0.0)
    p.add_argument("--ref-balance-weight", type=float, default=0.0)
    p.add_argument("--recon-weight", type=float, default=None, help="default 1 when experts train layerwise")
    p.add_argument("--lm-weight", type=float, default=0.0)
    p.add_argument("--distill-weight", type=float, default=None, help="default 1 when experts train end2end")
    p.add_argument("--chooser-weight", type=float, default=0.0,
                   help="activation-sparse models with a learned chooser (`factorllm sparsify --chooser-steps`): "
                        "train it along at this weight of the chooser loss (default 0: frozen)")
    p.add_argument("--chooser-lr", type=float, default=None, help="the chooser's rate (default: --lr)")
    p.add_argument("--straight-through", action="store_true")
    p.add_argument("--no-teacher-cache", action="store_true",
                   help="end2end: run the whole teacher every step instead of keeping each window's hidden states")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (per layer when layerwise)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--router-lr", type=float, default=None,
                   help="the routers' learning rate where it differs from --lr (e.g. experts 1e-4, routers 1e-3)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per step (end2end)")
    p.add_argument("--token-batch", type=int, default=1024, help="tokens per step (layerwise)")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="run folder: checkpoint.pt, then the trained model in model/")
    p.add_argument("--resume", action="store_true", help="continue from --output's checkpoint")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from factorllm.data import load_text, pack, split_windows, tokenize
    from factorllm.loading import load_model
    from factorllm.serialization import save
    from factorllm.train import TrainConfig, TrainData, train

    experts = args.train in ("experts", "both")
    recon = args.recon_weight if args.recon_weight is not None else (1.0 if experts and args.mode == "layerwise" else 0)
    distill = args.distill_weight if args.distill_weight is not None else (
        1.0 if experts and args.mode == "end2end" else 0.0)
    out = Path(args.output)
    cfg = TrainConfig(  # validated before anything heavy is loaded
        mode=args.mode, train_router=args.train in ("router", "both"), train_experts=experts,
        pseudo_label=args.pseudo_label, pa_weight=args.pa_weight, bce_weight=args.bce_weight,
        switch_weight=args.switch_weight, ref_balance_weight=args.ref_balance_weight, recon_weight=recon,
        lm_weight=args.lm_weight, distill_weight=distill, straight_through=args.straight_through,
        chooser_weight=args.chooser_weight, chooser_lr=args.chooser_lr,
        cache_teacher=not args.no_teacher_cache,
        max_steps=args.steps, lr=args.lr, router_lr=args.router_lr, batch_size=args.batch_size,
        token_batch=args.token_batch,
        layerwise_tokens=args.tokens, eval_every=args.eval_every, save_every=args.save_every,
        output_dir=str(out), resume=args.resume, seed=args.seed,
    )
    if (out / "model").exists() and not args.resume:
        raise FileExistsError(f"{out / 'model'} already exists; choose another --output or pass --resume")
    model, tok = load_model(args.model)
    teacher_spec = args.teacher or getattr(model, "factor_source", None)
    if teacher_spec is None:
        raise ValueError(f"{args.model} does not record its dense model; pass --teacher")
    teacher, _ = load_model(teacher_spec)
    ids = tokenize(tok, load_text(args.data, args.text_column), max_tokens=args.tokens + args.heldout_windows *
                   args.window)
    train_w, held_w = split_windows(pack(ids, args.window), args.heldout_windows, seed=args.seed) \
        if args.heldout_windows else (pack(ids, args.window), None)
    data = TrainData(train_w) if held_w is None else TrainData(train_w, held_w)
    result = train(model, teacher, data, cfg)
    save(model, out / "model", tok, overwrite=True)
    last = result.history[-1]["loss"] if result.history else float("nan")
    print(f"trained in {result.seconds / 60:.1f} min, last loss {last:.4f}; wrote {out / 'model'}")
    return 0
