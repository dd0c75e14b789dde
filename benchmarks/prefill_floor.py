"""How close the many-token MoE block is to its floor: the experts' GEMMs alone, against dense, per thread count.

For each FFN shape (8 experts, top-2, 512 tokens, the bench's contiguous experts and untrained router), prints in
one process, interleaved, medians:
- the whole MoE block / dense FFN (what `factorllm bench` reports),
- the experts' packed GEMMs alone, on each expert's real row count, one expert after another / dense: what
  the block would cost with routing, gather, activation and the token sums free,
at 1 and at all threads. The gap between the two lines is the block's own overhead.

    python benchmarks/prefill_floor.py
"""

from __future__ import annotations

import argparse

import torch

from factorllm import mkl
from factorllm.benchmark import _dense_llama_ffn, time_interleaved
from factorllm.config import FactorConfig
from factorllm.moe import MoEFeedForward


@torch.no_grad()
def measure(hidden: int, width: int, tokens: int, repeats: int, threads: int) -> tuple[float, float]:
    """(block / dense, experts' GEMMs alone / dense) for one FFN shape at `threads` threads."""
    dense = _dense_llama_ffn(hidden, width, torch.float32, "cpu")
    moe = MoEFeedForward.from_dense(dense, FactorConfig(8, 2), list(torch.arange(width).view(8, -1))).eval()
    x = torch.randn(1, tokens, hidden)
    rows = torch.bincount(moe.route(x.view(-1, hidden)).indices.view(-1), minlength=8).tolist()
    I = moe.experts.width
    packed = [(mkl.pack(moe.experts.w_in[e]), mkl.pack(moe.experts.w_out[e])) for e in range(8)]
    xs = [torch.randn(n, hidden) for n in rows]  # each expert's gathered tokens
    hs = [torch.empty(n, 2 * I) for n in rows]
    ys = [torch.empty(n, hidden) for n in rows]

    def gemms_alone():
        for e in range(8):
            mkl.linear(xs[e], packed[e][0], hs[e])  # [n, 2I]
            mkl.linear(hs[e][:, :I], packed[e][1], ys[e])  # [n, D]

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ms = time_interleaved({"dense": lambda: dense(x), "moe": lambda: moe(x), "gemms": gemms_alone}, repeats, 3,
                              "cpu")
    finally:
        torch.set_num_threads(before)
    return ms["moe"] / ms["dense"], ms["gemms"] / ms["dense"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="576x1536,2048x5632")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    if not mkl.available():
        raise SystemExit("this measurement needs MKL's packed GEMM (torch's x86 CPU wheel)")
    print("| hidden | ffn | threads | block / dense | experts' GEMMs alone / dense |")
    print("|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        try:
            hidden, width = map(int, shape.split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {shape!r} is not HIDDENxFFN (e.g. 576x1536), comma-separated") from None
        if width % 8:
            raise SystemExit(f"--shapes: ffn {width} must split into 8 equal experts (a multiple of 8)")
        for threads in sorted({1, torch.get_num_threads()}):
            block, gemms = measure(hidden, width, args.tokens, args.repeats, threads)
            print(f"| {hidden} | {width} | {threads} | {block:.3f} | {gemms:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
