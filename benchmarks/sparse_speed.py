"""Wall clock of activation sparsity (`factorllm.sparsify_`) against dense, side by side in one process.

- One FFN layer (SmolLM2's 576x1536 and TinyLlama's 2048x5632 shapes unless --shapes, random weights): the
  dense LlamaMLP, the SparseFFN as it runs (the native kernel up to `sparsity.KERNEL_MAX_TOKENS` tokens, where each
  token reads only its kept weights; masked dense products above), and the masked products alone, at 1, 4, 16, 32
  and 512 tokens (--tokens).
- The whole model (SmolLM2 unless --model): 512-token prefill and 32-token greedy decode through `generate`,
  dense against the sparsified model, then against it inside `dense_prefill` (prompts through the dense FFNs,
  decoding sparse).
Contenders interleaved run by run after a warm-up, medians (`factorllm.benchmark.time_interleaved`). The
ideal for the layer is the share of its weights the kept channels and neurons need, (2 p + n) / 3 (with
--exact-neurons, 2 p / 3 + n).

    python benchmarks/sparse_speed.py --json results/sparse_speed.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

from factorllm import load_model
from factorllm.benchmark import _dense_llama_ffn, time_interleaved, time_whole_model
from factorllm.serialization import atomic_write_text
from factorllm.sparsity import KERNEL_MAX_TOKENS, SparseFFN, SparsityConfig, dense_prefill, sparsify_


@torch.no_grad()
def bench_layer(hidden: int, width: int, tokens: int, cfg: SparsityConfig, repeats: int) -> dict:
    dense = _dense_llama_ffn(hidden, width, torch.float32, "cpu")
    sparse = SparseFFN.from_dense(dense, cfg).eval()
    x = torch.randn(1, tokens, hidden, generator=torch.Generator().manual_seed(0))
    keep_in, keep_h = sparse.kept_counts()
    ms = time_interleaved({"dense": lambda: dense(x), "sparse": lambda: sparse(x),
                           "masked": lambda: sparse.forward_masked(x.view(tokens, hidden), keep_in, keep_h)},
                          repeats, 3, "cpu")
    return {"hidden": hidden, "ffn": width, "tokens": tokens, **{f"{k}_ms": v for k, v in ms.items()},
            "sparse_ratio": ms["sparse"] / ms["dense"], "masked_ratio": ms["masked"] / ms["dense"],
            "ideal_ratio": cfg.ffn_compute(), "path": "native" if sparse._kernel is not None else "masked"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="whole-model timing on this model ('' to skip)")
    ap.add_argument("--shapes", default="576x1536,2048x5632", help="FFN layer shapes, hidden x ffn, comma-separated")
    ap.add_argument("--input-keep", type=float, default=0.55)
    ap.add_argument("--neuron-keep", type=float, default=0.40)
    ap.add_argument("--exact-neurons", action="store_true", help="SparsityConfig.exact_neurons")
    ap.add_argument("--tokens", default="1,4,16,32,512", help="token counts of the layer timings, comma-separated")
    ap.add_argument("--repeats", type=int, default=30, help="layer timings per contender")
    ap.add_argument("--model-repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SparsityConfig(args.input_keep, args.neuron_keep, exact_neurons=args.exact_neurons)
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        assert all(len(s) == 2 for s in shapes)
    except (ValueError, AssertionError):
        ap.error(f"--shapes takes hidden x ffn pairs such as 576x1536,2048x5632; got {args.shapes!r}")
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        ap.error(f"--tokens takes token counts such as 1,4,512; got {args.tokens!r}")
    layers = [bench_layer(h, f, t, cfg, args.repeats) for h, f in shapes for t in tokens]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; input / neuron keep "
          f"{cfg.input_keep} / {cfg.neuron_keep}{', exact neurons' if cfg.exact_neurons else ''} "
          f"({cfg.ffn_compute():.1%} of the FFN); kernel up to "
          f"{KERNEL_MAX_TOKENS} tokens; median of {args.repeats} interleaved runs")
    print("| hidden | ffn | tokens | dense ms | sparse ms | masked ms | sparse/dense | masked/dense | ideal | path |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in layers:
        print(f"| {r['hidden']} | {r['ffn']} | {r['tokens']} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | "
              f"{r['masked_ms']:.3f} | {r['sparse_ratio']:.3f} | {r['masked_ratio']:.3f} | {r['ideal_ratio']:.3f} | "
              f"{r['path']} |")
    result = {"config": {"input_keep": cfg.input_keep, "neuron_keep": cfg.neuron_keep,
                         "exact_neurons": cfg.exact_neurons,
                         "threads": torch.get_num_threads(), "torch": torch.__version__}, "layers": layers}
    if args.model:
        dense, _ = load_model(args.model)
        sparse = sparsify_(copy.deepcopy(dense), cfg).eval()
        m = time_whole_model(dense, sparse, 512, 32, args.model_repeats, "cpu", args.model)
        with dense_prefill(sparse):
            m_dp = time_whole_model(dense, sparse, 512, 32, args.model_repeats, "cpu", args.model)
        result["model"], result["model_dense_prefill"] = m.__dict__, m_dp.__dict__
        print(f"\nwhole model {args.model} (median of {args.model_repeats} interleaved runs): prefill (512 tokens) "
              f"dense {m.dense_prefill_tok_s:.0f} tok/s, sparse {m.moe_prefill_tok_s:.0f} tok/s, "
              f"{m.prefill_speedup:.2f}x; decode (32 tokens) dense {m.dense_decode_tok_s:.1f} tok/s, sparse "
              f"{m.moe_decode_tok_s:.1f} tok/s, {m.decode_speedup:.2f}x")
        print(f"inside dense_prefill: prefill {m_dp.prefill_speedup:.2f}x, decode {m_dp.decode_speedup:.2f}x")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
