"""How much quality training gives back: SmolLM2 factorized, routers trained with the PA loss, then experts.

For 25% and 50% of FFN compute, three stages, each continued from the last: routers alone (layer-wise, PA loss),
router + experts (layer-wise, reconstruction), then routers and experts end to end (logit distillation from the
dense teacher); each evaluated on held-out KJV books and on CPython's documentation (never trained on) against
dense, the oracle router on the same experts, and a random router on the same experts.

The defaults are the best recipe measured (benchmarks/RESULTS.md): 128 `importance` experts, a shared expert of 256
neurons, an MLP router, layer 0 dense, 32k tokens of KJV + Python source, a quarter of the minutes layer-wise and
three quarters end to end at rate 3e-4. `--curve-minutes M` evaluates the trained block every M training minutes
of the end-to-end stage into its row's `curve` (evaluation time not counted): where a longer budget would lead.

    python benchmarks/train_quality.py --minutes 28 --json results/train_quality.json   # 28 minutes per fraction
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable

import torch

from factorllm import FactorConfig, convert_, load_model, perplexity, set_routing_
from factorllm.data import kjv_text, load_text, pydoc_text, tokenize, windows
from factorllm.moe import moe_layers
from factorllm.serialization import atomic_write_text
from factorllm.train import TrainConfig, TrainData, train


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--minutes", type=float, default=28.0,
                    help="training minutes per FFN fraction, all stages together (the probes that size the "
                         "layer-wise stages and the evaluations come on top)")
    ap.add_argument("--e2e-share", type=float, default=0.75,
                    help="the end-to-end stage's share of --minutes; the two layer-wise stages split the rest, and "
                         "the end-to-end stage runs for what they leave (0: skip the end-to-end stage)")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--partition", default="importance")
    ap.add_argument("--gating", default="sum")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--router", default="mlp", help="router network (mlp, linear_nobias, linear)")
    ap.add_argument("--router-hidden", type=int, default=128, help="mlp router: hidden width")
    ap.add_argument("--shared-neurons", type=int, default=256,
                    help="an always-on shared expert of this many neurons; k is lowered to keep the FFN compute")
    ap.add_argument("--dense-layers", type=int, nargs="*", default=[0],
                    help="layers whose FFN stays dense; the others' k is lowered to keep the mean FFN compute "
                         "(the flag alone: none)")
    ap.add_argument("--router-loss", choices=["pa", "bce"], default="pa",
                    help="layer-wise router loss against the pseudo-labels: PA (KL, the paper's) or per-expert BCE")
    ap.add_argument("--train-tokens", type=int, default=32768)
    ap.add_argument("--train-data", default="kjv+python-source",
                    help="training corpora, '+'-joined, windows drawn equally from each: kjv, python-source (CPython's "
                         "standard library code, never the held-out docs), a text file or folder")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--router-lr", type=float, default=3e-3)
    ap.add_argument("--expert-lr", type=float, default=3e-4)
    ap.add_argument("--e2e-lr", type=float, default=3e-4,
                    help="end-to-end stage's rate (1e-4 before 2026-12-01: 3e-4 gained 3%% in the same steps, 1e-3 "
                         "was unstable)")
    ap.add_argument("--e2e-router-lr", type=float, default=None,
                    help="end-to-end stage: the routers' learning rate where it differs from --e2e-lr")
    ap.add_argument("--curve-minutes", type=float, default=0.0,
                    help="evaluate the trained block's held-out ppl every this many training minutes of the "
                         "end-to-end stage (the fraction's minutes so far), into its row's `curve` (0: only at the "
                         "end)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    if args.minutes <= 0 or not 0 <= args.e2e_share < 1 or args.curve_minutes < 0:
        ap.error(f"--minutes must be > 0, --e2e-share in [0, 1) and --curve-minutes >= 0, got {args.minutes}, "
                 f"{args.e2e_share} and {args.curve_minutes}")
    t_start = time.time()

    dense, tok = load_model(args.model)
    width, layers = dense.config.intermediate_size, dense.config.num_hidden_layers
    n_dense = len(set(args.dense_layers))
    plans = {frac: plan_k(frac, width, layers, args.shared_neurons, args.experts, n_dense)
             for frac in args.fractions}  # fraction -> (k, FFN compute)
    for frac, (k, compute) in plans.items():
        if compute > frac + 0.005 and n_dense < layers:  # all dense: convert_ says so
            sys.exit(f"at {frac:.0%} of the FFN compute this block needs {compute:.1%} with k = {k} (the shared "
                     f"expert and the dense layers {sorted(set(args.dense_layers))} leave no room): lower "
                     "--shared-neurons, keep fewer --dense-layers, or raise --fractions")
    corpora = [tokenize(tok, load_text(name)) for name in args.train_data.split("+")]  # once: train and calib
    train_w = mixed_windows(corpora, args.window, args.train_tokens // args.window, seed=0)
    calib = list(mixed_windows(corpora, args.window, 8, seed=1).split(4))
    evals = heldout_ids(tok, args.window, args.eval_windows)
    ppl = lambda m: {d: perplexity(m, ids, window=args.window) for d, ids in evals.items()}  # noqa: E731
    dense_ppl = ppl(dense)
    log(f"dense {dense_ppl}")

    # Each fraction gets --minutes: each layer-wise stage gets half of (1 - e2e_share) of them, in steps sized from
    # a timed first layer; the end-to-end stage runs for what is left of --minutes (checked after each step).
    # NOTE: what is left, not its share: a layer-wise stage that overran its estimate (a 2026-12-01 run: 6.6
    # minutes against 3.5, the machine shared) would otherwise push the fraction past --minutes.
    e2e_s = args.minutes * 60 * args.e2e_share
    budget_s = (args.minutes * 60 - e2e_s) / 2
    rows = []
    for frac in args.fractions:
        k, compute = plans[frac]
        cfg = FactorConfig(args.experts, k, partition=args.partition, gating=args.gating, router=args.router,
                           router_hidden=args.router_hidden, shared_neurons=args.shared_neurons,
                           dense_layers=tuple(args.dense_layers))
        model = convert_(copy.deepcopy(dense), cfg, calib=calib, progress=False)
        router_terms = {"pa": {"pa_weight": 1.0}, "bce": {"pa_weight": 0.0, "bce_weight": 1.0}}[args.router_loss]
        spent_s = 0.0  # this fraction's training seconds so far
        for stage, tcfg in (
            ("router", TrainConfig(mode="layerwise", pseudo_label="norm", lr=args.router_lr,
                                   layerwise_tokens=args.train_tokens, save_every=0, **router_terms)),
            ("router+experts", TrainConfig(mode="layerwise", train_experts=True, pseudo_label="norm",
                                           recon_weight=1.0, lr=args.expert_lr, layerwise_tokens=args.train_tokens,
                                           save_every=0, **router_terms)),
            ("router+experts, end2end", TrainConfig(mode="end2end", train_experts=True, pseudo_label="norm",
                                                    pa_weight=0.1, distill_weight=1.0, straight_through=True,
                                                    lr=args.e2e_lr, router_lr=args.e2e_router_lr, batch_size=2,
                                                    max_steps=10**6, save_every=0)),
        ):
            t0, curve = time.time(), Curve(ppl, model, f"top-{k}/{args.experts}")
            if tcfg.mode == "end2end":
                if e2e_s <= 0:
                    continue
                steps = timed_train(model, dense, train_w, tcfg, max(0.0, args.minutes * 60 - spent_s),
                                    every_s=args.curve_minutes * 60, at_mark=curve, offset_s=spent_s)
            else:
                steps = steps_for_budget(model, dense, train_w, tcfg, budget_s)
                tcfg = TrainConfig(**{**tcfg.__dict__, "max_steps": steps})
                t0 = time.time()
                train(model, dense, TrainData(train_w), tcfg)
            minutes = (time.time() - t0 - curve.seconds) / 60
            spent_s += minutes * 60
            row = {"experts": args.experts, "top_k": k, "partition": args.partition, "gating": args.gating,
                   "train_data": args.train_data,
                   "router": args.router, "router_loss": args.router_loss, "shared_neurons": args.shared_neurons,
                   "dense_layers": list(cfg.dense_layers),
                   "lr": tcfg.lr, "router_lr": tcfg.router_lr,
                   "ffn_compute": compute,
                   "stage": stage, "steps": steps, "train_minutes": minutes,
                   "ppl": {d: {"dense": dense_ppl[d]} for d in evals}}
            if curve.points:
                row["curve"] = curve.points
            for name, variant in (("trained", model), ("oracle", oracle_of(model)), ("random", random_of(model))):
                for d, v in ppl(variant).items():
                    row["ppl"][d][name] = v
            rows.append(row)
            log(f"{stage:>15} top-{k}/{args.experts}: {steps} steps, {minutes:.1f} min, "
                + ", ".join(f"{d}: " + " ".join(f"{n}={v:.2f}" for n, v in row["ppl"][d].items()) for d in evals))

    print(f"\nSmolLM2-135M, {args.experts} {args.partition} experts, {args.gating} gating, layerwise PA training on "
          f"{train_w.numel()} tokens of {args.train_data}; held-out ppl on {evals['pydoc'].numel()} tokens each")
    print("| FFN compute | stage | train min | pydoc dense | trained | oracle | random | kjv dense | trained | oracle "
          "| random |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p, q = r["ppl"]["pydoc"], r["ppl"]["kjv"]
        print(f"| {r['ffn_compute']:.0%} | {r['stage']} | {r['train_minutes']:.1f} | {p['dense']:.2f} | "
              f"{p['trained']:.2f} | {p['oracle']:.2f} | {p['random']:.1f} | {q['dense']:.2f} | {q['trained']:.2f} "
              f"| {q['oracle']:.2f} | {q['random']:.1f} |")
    print(f"total {(time.time() - t_start) / 60:.1f} min")
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2))
    return 0


def heldout_ids(tok, window: int, count: int) -> dict[str, torch.Tensor]:
    """The held-out evaluation tokens: `count` windows each of the Python docs and of KJV's held-out books."""
    return {"pydoc": windows(tokenize(tok, pydoc_text()), window, count, seed=0).reshape(-1),
            "kjv": windows(tokenize(tok, kjv_text("heldout")), window, count, seed=0).reshape(-1)}


def plan_k(fraction: float, width: int, layers: int, shared: int, experts: int, n_dense: int) -> tuple[int, float]:
    """k for the factorized layers, such that the mean FFN compute over all layers (the `n_dense` dense ones at
    1) is at most `fraction`, and that mean compute."""
    # NOTE: max(1, ...) so that all layers dense reaches convert_'s error
    sparse_frac = (fraction * layers - n_dense) / max(1, layers - n_dense)
    k = routed_k(sparse_frac, width, shared, experts)
    per_expert = (width - shared) / experts
    return k, (n_dense + (layers - n_dense) * (shared + k * per_expert) / width) / layers


def routed_k(fraction: float, width: int, shared: int, experts: int) -> int:
    """The largest k such that the shared neurons plus k of the equal routed experts are at most `fraction` of
    the FFN's width (at least 1).

    NOTE: rows measured before 2026-12-01 rounded to the nearest k instead: 25% with 256 shared neurons and 128
    experts ran k = 13 (25.1% of the FFN); it is 12 now (24.5%). 50% is k = 51 either way.
    """
    per_expert = (width - shared) / experts
    return max(1, math.floor((fraction * width - shared) / per_expert + 1e-9))


def mixed_windows(corpora: list[torch.Tensor], window: int, count: int, seed: int) -> torch.Tensor:
    """`count` windows [count, window], drawn equally from each corpus's token ids, shuffled."""
    per = [count // len(corpora) + (i < count % len(corpora)) for i in range(len(corpora))]
    wins = torch.cat([windows(ids, window, c, seed=seed) for ids, c in zip(corpora, per, strict=True)])
    return wins[torch.randperm(len(wins), generator=torch.Generator().manual_seed(seed))]


def timed_train(model, dense, train_w, tcfg: TrainConfig, seconds: float, every_s: float = 0.0,
                at_mark: Callable[[int, float], None] | None = None, offset_s: float = 0.0) -> int:
    """Trains until `seconds` of training have passed (checked after each step); returns the steps taken.

    With `every_s` and `at_mark`: each time the training clock, which starts at `offset_s` (training already spent
    on this model), passes a multiple of `every_s` before the end, `at_mark(step, clock_s)` runs (an evaluation,
    say) and its own time is not counted as training.
    """
    t0, taken, paused = time.time(), [0], [0.0]
    next_mark = [(offset_s // every_s + 1) * every_s if every_s > 0 else math.inf]

    def stop_on_time(step, row):
        taken[0] = step
        trained = time.time() - t0 - paused[0]
        if at_mark is not None and offset_s + trained >= next_mark[0] and trained < seconds:
            start = time.time()
            at_mark(step, offset_s + trained)
            paused[0] += time.time() - start
            while next_mark[0] <= offset_s + trained:
                next_mark[0] += every_s
        if trained > seconds:
            raise StopIteration

    try:
        train(model, dense, TrainData(train_w), tcfg, callbacks=[stop_on_time], progress=False)
    except StopIteration:
        pass
    return taken[0]


class Curve:
    """Held-out perplexity along a timed stage, as `timed_train`'s `at_mark`: its points (training minutes so far,
    steps, ppl per domain) and the seconds the evaluations took, which are not training time."""

    def __init__(self, ppl: Callable[[torch.nn.Module], dict[str, float]], model: torch.nn.Module, label: str):
        self.ppl, self.model, self.label = ppl, model, label
        self.points: list[dict] = []
        self.seconds = 0.0

    def __call__(self, step: int, clock_s: float) -> None:
        start = time.time()
        point = {"minutes": clock_s / 60, "steps": step, "ppl": self.ppl(self.model)}
        self.points.append(point)
        self.seconds += time.time() - start
        log(f"  curve {self.label}: {point['minutes']:.1f} min, {step} steps, "
            + ", ".join(f"{d}={v:.2f}" for d, v in point["ppl"].items()))


def steps_for_budget(model, dense, train_w, tcfg: TrainConfig, budget_s: float) -> int:
    """Steps per layer that fit the stage's budget: steps 2 to 6 timed on a copy of layer 0, plus caching."""
    probe = copy.deepcopy(model)
    cfg = TrainConfig(**{**tcfg.__dict__, "max_steps": 6, "layerwise_tokens": tcfg.token_batch})
    stamps = []

    def first_layer_only(step, row):
        stamps.append(time.time())
        if step == 6:
            raise StopIteration

    try:
        train(probe, dense, TrainData(train_w[:2]), cfg, callbacks=[first_layer_only], progress=False)
    except StopIteration:
        pass
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    layers = len(moe_layers(model))
    caching = 1.2 * train_w.shape[0]  # NOTE: about 1.2 s a 512-token window on this CPU
    return max(10, int((budget_s - caching) / (layers * per_step)))


def oracle_of(model):
    m = copy.deepcopy(model)
    return set_routing_(m, gating="oracle")


def random_of(model):
    m = copy.deepcopy(model)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(1234)
        for _, block in moe_layers(m):
            for p in block.router.net.parameters():
                p.normal_(0, 1.0)
    return m


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
