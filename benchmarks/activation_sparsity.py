"""Activation sparsity (TEAL/CATS-style, `factorllm.sparsify_`) on SmolLM2 at the FFN fractions of
`train_quality.py`: training-free, then its FFN weights fine-tuned end to end by logit distillation.

Each token keeps its largest hidden channels for the gate/up projections and its largest neurons for the down
projection (`factorllm.sparsity`); no router. For each FFN fraction, `input_keep` is chosen from a grid by the
distillation loss on two training windows (never the held-out text), and `neuron_keep` follows from the fraction.
Held-out perplexity on the Python docs and KJV's held-out books against dense and against the per-neuron oracle
(each token's exact top neurons by |h| * ||w_out||, the whole fraction spent on neurons: what routing at neuron
granularity could reach with a perfect predictor). Same data, windows and evaluation as `train_quality.py`.
`--layerwise-steps N` adds a layer-wise reconstruction stage (N steps a layer) before the end-to-end one, inside
the same --minutes. `--chooser-steps N` (with --exact-neurons) first fits a learned neuron chooser
(`factorllm.sparsity.fit_chooser_`, N steps a layer on --chooser-tokens of the training text), also inside --minutes;
`--chooser-weight W` trains it along in the end-to-end stage (TrainConfig.chooser_weight); `--chooser-refit` fits it
again at the end, to the fine-tuned FFN weights. `--input-keep X` sets the input share instead of the grid search.
`--curve-minutes M` evaluates held-out perplexity every M training minutes of the end-to-end stage (the fraction's
minutes so far, the chooser's included; evaluation time not counted) into the row's `curve`: where a longer
budget would lead.

    python benchmarks/activation_sparsity.py --minutes 28 --json results/activation_sparsity.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

from train_quality import Curve, heldout_ids, log, mixed_windows, timed_train

from factorllm import load_model, perplexity
from factorllm.adapters import ffns_gated, find_ffns
from factorllm.data import load_text, tokenize
from factorllm.serialization import atomic_write_text
from factorllm.sparsity import SparsityConfig, choose_input_keep, fit_chooser_, mean_recall, sparsify_
from factorllm.train import TrainConfig, TrainData, train

# NOTE: the run of 2026-12-01 (benchmarks/RESULTS.md) tried input shares (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8,
# 0.9): at 25% of the FFN compute it left 0.3 alone of the valid shares, [0.125, 0.375). Now sparsity.INPUT_KEEP_GRID.


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--minutes", type=float, default=28.0,
                    help="training minutes per FFN fraction, both stages together (0: training-free only)")
    ap.add_argument("--layerwise-steps", type=int, default=0,
                    help="steps a layer of layer-wise reconstruction (lr 3e-4, on cached activations) before the "
                         "end-to-end stage, which gets the rest of --minutes (0: none)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--dense-layers", type=int, nargs="*", default=[],
                    help="layers whose FFN stays dense; the others run less to keep the mean compute")
    ap.add_argument("--exact-neurons", action="store_true",
                    help="the input-sparse pass only chooses the neurons; the chosen ones run on the whole input "
                         "(SparsityConfig.exact_neurons)")
    ap.add_argument("--chooser-steps", type=int, default=0,
                    help="steps a layer of fitting a learned neuron chooser before the other stages (needs "
                         "--exact-neurons; 0: the input-sparse pass reads the FFN's own weights)")
    ap.add_argument("--chooser-tokens", type=int, default=16384, help="training tokens the chooser is fitted on")
    ap.add_argument("--chooser-weight", type=float, default=0.0,
                    help="train the chooser along in the end-to-end stage, with the chooser loss at this weight "
                         "(TrainConfig.chooser_weight; needs --chooser-steps; 0: frozen there)")
    ap.add_argument("--chooser-lr", type=float, default=3e-3, help="the chooser's rate in the end-to-end stage")
    ap.add_argument("--chooser-step-tokens", type=int, default=256,
                    help="tokens of each end-to-end step the chooser loss reads (TrainConfig.chooser_tokens)")
    ap.add_argument("--chooser-refit", action="store_true",
                    help="fit the chooser again after the end-to-end stage, to the fine-tuned FFN weights (its "
                         "minutes, as long as the first fit took, come out of the end-to-end stage's)")
    ap.add_argument("--input-keep", type=float,
                    help="the input share at every fraction, instead of the one the grid search chooses (the "
                         "search runs without a chooser, and with one a lower share can be better)")
    ap.add_argument("--train-tokens", type=int, default=32768)
    ap.add_argument("--train-data", default="kjv+python-source")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-4, help="end-to-end rate")
    ap.add_argument("--curve-minutes", type=float, default=0.0,
                    help="evaluate held-out ppl every this many training minutes of the end-to-end stage, into "
                         "its row's `curve` (0: only at the end)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    if args.curve_minutes < 0:
        ap.error(f"--curve-minutes must be >= 0, got {args.curve_minutes}")
    if args.chooser_steps and not args.exact_neurons:
        ap.error("--chooser-steps needs --exact-neurons")
    if (args.chooser_refit or args.chooser_weight) and not args.chooser_steps:
        ap.error("--chooser-refit and --chooser-weight need --chooser-steps")
    if args.minutes < 0 or not all(0 < f <= 1 for f in args.fractions):
        ap.error(f"--minutes must be >= 0 and --fractions in (0, 1], got {args.minutes} and {args.fractions}")
    t_start = time.time()

    dense, tok = load_model(args.model)
    layers = dense.config.num_hidden_layers
    gated = ffns_gated(find_ffns(dense))  # the compute accounting differs for plain FFNs (GPT-2)
    corpora = [tokenize(tok, load_text(name)) for name in args.train_data.split("+")]
    train_w = mixed_windows(corpora, args.window, args.train_tokens // args.window, seed=0)
    evals = heldout_ids(tok, args.window, args.eval_windows)
    ppl = lambda m: {d: perplexity(m, ids, window=args.window) for d, ids in evals.items()}  # noqa: E731
    dense_ppl = ppl(dense)
    log(f"dense {dense_ppl}")
    probe = train_w[:2]  # chooses the input share (never the held-out text)

    rows = []
    for frac in args.fractions:
        try:
            if args.input_keep is None:
                cfg, scored = choose_input_keep(dense, probe, frac, tuple(args.dense_layers), args.exact_neurons)
            else:
                cfg, scored = SparsityConfig.for_compute(frac, args.input_keep, gated, tuple(args.dense_layers),
                                                         layers, args.exact_neurons), {}
        except ValueError as err:
            sys.exit(f"{err} (--fractions, --input-keep)")
        how = f"by probe loss {({k: round(v, 4) for k, v in scored.items()})} ->" if scored else "given:"
        log(f"{frac:.0%}: input_keep {how} {cfg.input_keep}, neuron_keep {cfg.neuron_keep:.3f}")
        sparse_frac = cfg.ffn_compute(gated)
        oracle_ppl = ppl(sparsify_(copy.deepcopy(dense), SparsityConfig(1.0, sparse_frac, cfg.dense_layers)))
        model = sparsify_(copy.deepcopy(dense), cfg)
        compute = cfg.mean_compute(layers, gated)
        stages = [("training-free", None)]
        if args.chooser_steps:
            stages.append(("chooser", "chooser"))  # training-free still: no FFN weight changes
        if args.minutes > 0 and args.layerwise_steps:
            stages.append(("layer-wise", TrainConfig(mode="layerwise", train_router=False, train_experts=True,
                                                     recon_weight=1.0, lr=3e-4, max_steps=args.layerwise_steps,
                                                     layerwise_tokens=args.train_tokens, save_every=0)))
        if args.minutes > 0:
            stages.append(("end2end", TrainConfig(mode="end2end", train_router=False, train_experts=True,
                                                  distill_weight=1.0, lr=args.lr, batch_size=2, max_steps=10**6,
                                                  chooser_weight=args.chooser_weight, chooser_lr=args.chooser_lr,
                                                  chooser_tokens=args.chooser_step_tokens,
                                                  save_every=0)))
        if args.chooser_refit:
            stages.append(("chooser refit", "chooser"))
        spent = 0.0  # training minutes of this fraction so far
        reserve = 0.0  # minutes kept back for the refit: as long as the first fit took
        for stage, tcfg in stages:
            t0, curve = time.time(), Curve(ppl, model, f"{frac:.0%}")  # the end-to-end stage's ppl along the way
            if tcfg is None:
                steps = 0
            elif tcfg == "chooser":
                recalls = fit_chooser_(model, train_w[:max(1, args.chooser_tokens // args.window)],
                                       steps=args.chooser_steps)
                steps = args.chooser_steps
                if args.chooser_refit and stage == "chooser":  # the first fit
                    reserve = (time.time() - t0) / 60
                before, after = mean_recall(recalls)
                log(f"chooser recall of the exact neurons, mean over layers: {before:.3f} -> {after:.3f}")
            elif tcfg.mode == "layerwise":
                train(model, dense, TrainData(train_w), tcfg, progress=False)
                steps = tcfg.max_steps
            else:
                steps = timed_train(model, dense, train_w, tcfg, max(0.0, args.minutes - spent - reserve) * 60,
                                    every_s=args.curve_minutes * 60, at_mark=curve, offset_s=spent * 60)
            minutes = (time.time() - t0 - curve.seconds) / 60
            spent += minutes
            row = {"strategy": "activation_sparsity", "input_keep": cfg.input_keep, "neuron_keep": cfg.neuron_keep,
                   "exact_neurons": cfg.exact_neurons,
                   "dense_layers": list(cfg.dense_layers), "ffn_compute": compute, "train_data": args.train_data,
                   "chooser_steps": args.chooser_steps, "chooser_weight": args.chooser_weight,
                   "chooser_step_tokens": args.chooser_step_tokens if args.chooser_weight else None,
                   "lr": getattr(tcfg, "lr", None), "stage": stage, "steps": steps,
                   "train_minutes": minutes, "ppl": {}}
            if curve.points:
                row["curve"] = curve.points
            for d, v in ppl(model).items():
                row["ppl"][d] = {"dense": dense_ppl[d], "trained": v, "oracle": oracle_ppl[d]}
            rows.append(row)
            log(f"{stage:>13} {frac:.0%}: {steps} steps, {minutes:.1f} min, "
                + ", ".join(f"{d}: " + " ".join(f"{n}={v:.2f}" for n, v in row["ppl"][d].items()) for d in evals))

    print(f"\nSmolLM2-135M, activation sparsity, end-to-end distillation on {train_w.numel()} tokens of "
          f"{args.train_data}; held-out ppl on {evals['pydoc'].numel()} tokens each")
    print("| FFN compute | input / neuron keep | stage | train min | pydoc dense | sparse | neuron oracle | kjv dense "
          "| sparse | neuron oracle |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p, q = r["ppl"]["pydoc"], r["ppl"]["kjv"]
        print(f"| {r['ffn_compute']:.1%} | {r['input_keep']:.2f} / {r['neuron_keep']:.3f} | {r['stage']} | "
              f"{r['train_minutes']:.1f} | {p['dense']:.2f} | {p['trained']:.2f} | {p['oracle']:.2f} | "
              f"{q['dense']:.2f} | {q['trained']:.2f} | {q['oracle']:.2f} |")
    print(f"total {(time.time() - t_start) / 60:.1f} min")
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
