"""Which router objective picks a factorized block's experts best? The layer-wise router stage alone, per loss.

SmolLM2 cut into 128 `importance` experts with a 256-neuron shared expert at 50% FFN compute (the block of
`train_quality.py`'s best rows); every layer's router trained from the same cached dense activations for the same
steps under each objective, then held-out perplexity on the Python docs and KJV, and the recall of the oracle's
choice (the share of the k experts with the largest output norm that the router picks), averaged over layers.

    python benchmarks/router_objectives.py --objectives pa bce set_ce log_norm_mse --steps 200

The PA loss is `factorllm.losses.pa_loss`; the others are defined here, as the baselines it is measured against.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time

import torch
from torch import nn
from train_quality import heldout_ids, log, mixed_windows, routed_k

from factorllm import FactorConfig, convert_, load_model, losses, perplexity
from factorllm.data import load_text, tokenize
from factorllm.moe import moe_layers
from factorllm.serialization import atomic_write_text
from factorllm.train import cache_ffn_activations


def set_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy toward the uniform distribution over the oracle's k experts (forward KL to a sharp target)."""
    return -(logits.log_softmax(dim=-1) * labels).sum(dim=-1).mean() / labels[0].sum()


def log_norm_mse(logits: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """The logits regress each expert's log output norm (a graded target instead of a 0/1 label)."""
    return (logits - norms.clamp_min(1e-6).log()).square().mean()


def soft_kl(logits: torch.Tensor, norms: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """KL(q || p) with q = softmax(log norms / temperature)."""
    logq = (norms.clamp_min(1e-6).log() / temperature).log_softmax(dim=-1)  # [T, E]
    return (logq.exp() * (logq - logits.log_softmax(dim=-1))).sum(dim=-1).mean()


# objective name -> (router logits [T, E], 0/1 oracle labels [T, E], output norms [T, E]) -> loss
OBJECTIVES = {
    "pa": lambda z, lab, n: losses.pa_loss(z, lab),
    "bce": lambda z, lab, n: losses.router_bce_loss(z, lab),
    "set_ce": lambda z, lab, n: set_ce(z, lab),
    "log_norm_mse": lambda z, lab, n: log_norm_mse(z, n),
    "soft_kl": lambda z, lab, n: soft_kl(z, n),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--shared-neurons", type=int, default=256)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--router-hidden", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per layer")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-tokens", type=int, default=32768)
    ap.add_argument("--train-data", default="kjv+python-source")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    window = 512

    dense, tok = load_model(args.model)
    corpora = [tokenize(tok, load_text(name)) for name in args.train_data.split("+")]
    train_w = mixed_windows(corpora, window, args.train_tokens // window, seed=0)
    calib = list(mixed_windows(corpora, window, 8, seed=1).split(4))
    evals = heldout_ids(tok, window, args.eval_windows)
    k = routed_k(args.fraction, dense.config.intermediate_size, args.shared_neurons, args.experts)
    cfg = FactorConfig(args.experts, k, partition="importance", gating="sum", router="mlp",
                       router_hidden=args.router_hidden, shared_neurons=args.shared_neurons)
    base = convert_(copy.deepcopy(dense), cfg, calib=calib, progress=False)
    inputs = [x for x, _ in cache_ffn_activations(dense, train_w, progress=False)]  # per layer [T, D]
    with torch.no_grad():  # each layer's expert output norms [T, E]: the oracle's scores, computed once
        norms = [torch.cat([b.experts.output_norms(c) for c in x.split(4096)])
                 for (_, b), x in zip(moe_layers(base), inputs, strict=True)]
    log(f"top-{k} of {args.experts}; activations of {train_w.numel()} tokens cached")

    rows = []
    for name in args.objectives:
        model, t0 = copy.deepcopy(base), time.time()
        recalls = [train_router(block.router.net, x, n, k, OBJECTIVES[name], args.steps, args.lr, seed=li)
                   for li, ((_, block), x, n) in enumerate(zip(moe_layers(model), inputs, norms, strict=True))]
        row = {"objective": name, "experts": args.experts, "top_k": k, "steps": args.steps,
               "router_hidden": args.router_hidden, "train_minutes": (time.time() - t0) / 60,
               "recall": sum(recalls) / len(recalls),
               "ppl": {d: perplexity(model, ids, window=window) for d, ids in evals.items()}}
        rows.append(row)
        log(f"{name}: pydoc {row['ppl']['pydoc']:.2f}, kjv {row['ppl']['kjv']:.2f}, recall {row['recall']:.3f}")

    print(f"\n{args.model}, {args.experts} experts + {args.shared_neurons} shared, top-{k}; routers trained "
          f"{args.steps} steps a layer on {train_w.numel()} tokens of {args.train_data}")
    print("| objective | pydoc | kjv | recall of the oracle's choice | train min |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['objective']} | {r['ppl']['pydoc']:.2f} | {r['ppl']['kjv']:.2f} | {r['recall']:.3f} "
              f"| {r['train_minutes']:.1f} |")
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2))
    return 0


def train_router(net: nn.Module, x: torch.Tensor, norms: torch.Tensor, k: int, objective, steps: int, lr: float,
                 seed: int, batch: int = 1024, probe: int = 2048) -> float:
    """Trains one router network on cached inputs x [T, D] against the oracle's scores [T, E]; returns its recall
    of the oracle's k experts on the last `probe` tokens."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = objective(net(x[idx]), losses.top_k_mask(norms[idx], k), norms[idx])
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    net.eval()
    with torch.no_grad():
        chosen = net(x[-probe:]).topk(k, dim=-1).indices  # [probe, k]
        return losses.top_k_mask(norms[-probe:], k).gather(1, chosen).mean().item()


if __name__ == "__main__":
    sys.exit(main())
