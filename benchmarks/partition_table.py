"""Which partition and granularity to use: held-out perplexity of SmolLM2 factorized every way, oracle router.

For 8 and 32 experts and every registered partition, the table gives perplexity on CPython's documentation
(never used for calibration) with all experts on (must equal dense), and with the oracle router (each token
keeps the k experts with the largest output norm) at 25% and 50% of the FFN's compute.
Calibration (data-driven partitions): KJV training books.

    python benchmarks/partition_table.py [--model smollm2-135m] [--eval-windows 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time

import torch

from factorllm import FactorConfig, convert_, load_model, perplexity, set_routing_
from factorllm.data import kjv_text, pydoc_text, tokenize, windows
from factorllm.partition import PARTITIONS
from factorllm.serialization import atomic_write_text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--partitions", nargs="+", default=PARTITIONS.names(), choices=PARTITIONS.names())
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out windows of --window tokens (default 8)")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()

    dense, tok = load_model(args.model)
    heldout = windows(tokenize(tok, pydoc_text()), args.window, args.eval_windows, seed=0).reshape(-1)
    calib = list(windows(tokenize(tok, kjv_text("train")), args.window, args.calib_tokens // args.window,
                         seed=0).split(4))
    ppl = lambda m: perplexity(m, heldout, window=args.window)  # noqa: E731
    dense_ppl = ppl(dense)
    log(f"dense ppl {dense_ppl:.2f} ({heldout.numel()} held-out tokens, {time.time() - start:.0f}s)")

    rows = []
    for num_experts in args.experts:
        ks = (num_experts // 4, num_experts // 2)
        for name in args.partitions:
            t0 = time.time()
            model = convert_(copy.deepcopy(dense), FactorConfig(num_experts, num_experts, partition=name),
                             calib=calib, progress=False)
            row = {"experts": num_experts, "partition": name, "all_on": ppl(model)}
            for k in ks:
                set_routing_(model, top_k=k, gating="oracle")
                row[f"oracle_top{k}"] = ppl(model)
            rows.append(row)
            del model
            log(f"{num_experts:>3} experts {name:<13} {time.time() - t0:5.0f}s  " +
                "  ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("experts", "partition")))

    print(f"\nHeld-out perplexity, Python docs ({heldout.numel()} tokens, {args.window}-token windows), "
          f"{args.model}, fp32, {args.threads} threads, torch {torch.__version__}, {platform.machine()}")
    print(f"dense: {dense_ppl:.2f}\n")
    print("| experts | partition | all on | oracle 25% | oracle 50% | 25% / dense |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        e = r["experts"]
        q, h = r[f"oracle_top{e // 4}"], r[f"oracle_top{e // 2}"]
        print(f"| {e} | {r['partition']} | {r['all_on']:.2f} | {q:,.1f} | {h:,.1f} | {q / dense_ppl:,.1f}x |")
    print(f"\n25% = top-{args.experts[0] // 4} of {args.experts[0]}"
          + "".join(f", top-{e // 4} of {e}" for e in args.experts[1:])
          + "; 50% = half the experts. Oracle: each token keeps the experts with the largest output norm.")
    print(f"total {time.time() - start:.0f}s")
    if args.json:
        atomic_write_text(args.json, json.dumps({"dense": dense_ppl, "tokens": heldout.numel(), "rows": rows},
                                                indent=2))
    return 0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
