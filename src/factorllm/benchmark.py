"""Wall-clock benchmarks: the FFN layer alone and the whole model, dense and MoE side by side in one process.

Every measurement interleaves the contenders (dense, MoE, Mixtral peer) run by run, after a warm-up, and reports
medians, so a slow moment of the machine hits all of them alike. Results are dataclasses; `conditions()` says
what they were measured under.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from factorllm.config import FactorConfig
from factorllm.moe import MoEFeedForward


@dataclass(frozen=True)
class BenchConfig:
    """What to time. `shapes` are (hidden, ffn) pairs; `tokens` the token counts of the FFN benchmark."""

    num_experts: int = 8
    top_k: int = 2
    shapes: tuple[tuple[int, int], ...] = ((576, 1536), (2048, 5632))
    tokens: tuple[int, ...] = (1, 512)
    repeats: int = 15
    warmup: int = 3
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    model: str | None = "smollm2-135m"
    prompt_tokens: int = 512
    decode_tokens: int = 32
    # NOTE: 9, not 5: a generate() call's time varies by a few percent from run to run; with 5 the median
    # decode speed-up spread 1.34-1.44x over ten processes on the 2-core CPU
    model_repeats: int = 9

    def __post_init__(self) -> None:
        FactorConfig(self.num_experts, self.top_k)  # validates k and E
        if self.repeats < 1 or self.model_repeats < 1:
            raise ValueError("repeats and model_repeats must be >= 1")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}; use float32, bfloat16 or float16")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class FFNResult:
    hidden: int
    ffn: int
    tokens: int
    dense_ms: float
    moe_ms: float
    mixtral_ms: float
    ratio: float  # moe / dense
    ideal_ratio: float  # top_k / num_experts
    mixtral_ratio: float  # mixtral / dense
    path: str  # the expert path the MoE block took


@dataclass
class ModelResult:
    model: str
    prompt_tokens: int
    decode_tokens: int
    dense_prefill_tok_s: float
    moe_prefill_tok_s: float
    prefill_speedup: float
    dense_decode_tok_s: float
    moe_decode_tok_s: float
    decode_speedup: float

    @classmethod
    def from_medians(cls, model: str, prompt_tokens: int, decode_tokens: int, prefill_ms: dict[str, float],
                     decode_ms: dict[str, float]) -> ModelResult:
        """From median milliseconds per prefill and per whole decode, keyed "dense" and "moe"."""
        p, n = prompt_tokens, decode_tokens
        return cls(model, p, n, p / prefill_ms["dense"] * 1e3, p / prefill_ms["moe"] * 1e3,
                   prefill_ms["dense"] / prefill_ms["moe"], n / decode_ms["dense"] * 1e3, n / decode_ms["moe"] * 1e3,
                   decode_ms["dense"] / decode_ms["moe"])


@dataclass
class BenchResult:
    conditions: dict
    ffn: list[FFNResult] = field(default_factory=list)
    model: ModelResult | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def conditions(cfg: BenchConfig) -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": cfg.device if cfg.device != "cuda" else torch.cuda.get_device_name(),
        "dtype": cfg.dtype,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "repeats": cfg.repeats,
        "model_repeats": cfg.model_repeats,
    }


def device_sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: str) -> dict[str, float]:
    """Median milliseconds of each function, run in turn `repeats` times after `warmup` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            device_sync(device)
            t0 = time.perf_counter()
            fn()
            device_sync(device)
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _dense_llama_ffn(hidden: int, ffn: int, dtype: torch.dtype, device: str) -> nn.Module:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, hidden_act="silu", num_attention_heads=1,
                      num_key_value_heads=1)  # heads only satisfy the config's checks: the FFN has none
    mlp = LlamaMLP(cfg)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, p.shape[1] ** -0.5)
    return mlp.to(device=device, dtype=dtype).eval()


def mixtral_peer(moe: MoEFeedForward) -> nn.Module:
    """transformers' own MixtralSparseMoeBlock carrying the same experts and router weights (no router bias)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    experts = moe.experts
    E, mI, D = experts.w_in.shape
    cfg = MixtralConfig(hidden_size=D, intermediate_size=mI // 2, num_local_experts=E, num_attention_heads=1,
                        num_key_value_heads=1, num_experts_per_tok=moe.router.top_k, hidden_act="silu")
    block = MixtralSparseMoeBlock(cfg).to(device=experts.w_in.device, dtype=experts.w_in.dtype)
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(experts.w_in)
        block.experts.down_proj.copy_(experts.w_out)
        block.gate.weight.copy_(moe.router.net.weight)
    return block.eval()


@torch.no_grad()
def bench_ffn(cfg: BenchConfig) -> list[FFNResult]:
    """One FFN layer: the dense LlamaMLP, its MoE factorization, and Mixtral's block on the same weights."""
    results = []
    for hidden, width in cfg.shapes:
        dense = _dense_llama_ffn(hidden, width, cfg.torch_dtype, cfg.device)
        part = list(torch.arange(width).view(cfg.num_experts, -1))
        moe = MoEFeedForward.from_dense(dense, FactorConfig(cfg.num_experts, cfg.top_k), part).eval()
        peer = mixtral_peer(moe)
        for tokens in cfg.tokens:
            x = torch.randn(1, tokens, hidden, device=cfg.device, dtype=cfg.torch_dtype)
            fns = {"dense": lambda d=dense, x=x: d(x), "moe": lambda m=moe, x=x: m(x),
                   "mixtral": lambda p=peer, x=x: p(x)}
            ms = time_interleaved(fns, cfg.repeats, cfg.warmup, cfg.device)
            results.append(FFNResult(
                hidden, width, tokens, ms["dense"], ms["moe"], ms["mixtral"], ms["moe"] / ms["dense"],
                cfg.top_k / cfg.num_experts, ms["mixtral"] / ms["dense"], path_taken(moe, x.view(-1, hidden)),
            ))
    return results


def path_taken(moe: MoEFeedForward, x: torch.Tensor) -> str:
    """How the block runs x [T, D] under no_grad: "native" (the batch-1 kernel), "native-routed" (the many-token
    kernel with the routing inside) or an expert path's name."""
    from factorllm.experts import DECODE_MAX_TOKENS, choose_path

    if x.shape[0] == 1 and moe.decode_kernel(x) is not None:
        return "native"
    if x.shape[0] > DECODE_MAX_TOKENS and moe._prefill_routed_applies(x):
        return "native-routed"
    path = moe.experts.path or choose_path(moe.experts, x, moe.route(x).indices)
    return f"{path}+packed" if path == "sorted" and moe.experts.can_pack else path


@torch.no_grad()
def bench_model(cfg: BenchConfig, progress: Callable[[str], None] = lambda s: None) -> ModelResult:
    """Whole model: prefill tokens/s over a `prompt_tokens` prompt, and decode tokens/s through `generate`
    with a KV cache, dense against its factorization (contiguous experts: speed does not depend on which
    neurons share an expert)."""
    from factorllm.convert import convert_
    from factorllm.loading import load_model

    dense, _ = load_model(cfg.model, dtype=cfg.torch_dtype)
    dense.to(cfg.device)
    moe = convert_(copy.deepcopy(dense), FactorConfig(cfg.num_experts, cfg.top_k), progress=False)
    return time_whole_model(dense, moe, cfg.prompt_tokens, cfg.decode_tokens, cfg.model_repeats, cfg.device,
                            cfg.model, progress)


@torch.no_grad()
def time_whole_model(dense: nn.Module, moe: nn.Module, prompt_tokens: int = 512, decode_tokens: int = 32,
                     repeats: int = 5, device: str = "cpu", name: str = "",
                     progress: Callable[[str], None] = lambda s: None) -> ModelResult:
    """Prefill tokens/s over a `prompt_tokens` prompt and decode tokens/s through `generate` with a KV cache,
    dense and MoE interleaved."""
    vocab = dense.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    progress("prefill")
    # NOTE: prefill as `generate` runs it: a KV cache is filled and only the last position's logits are
    # computed (the full [512, vocab] LM head would be a fifth of the FLOPs and measure nothing of the FFNs).
    fill = dict(use_cache=True, logits_to_keep=1)
    pre = time_interleaved({"dense": lambda: dense(input_ids=prompt, **fill),
                            "moe": lambda: moe(input_ids=prompt, **fill)}, repeats, 1, device)
    short = prompt[:, :16]
    gen = dict(max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False, pad_token_id=0)
    progress("decode")
    dec = time_interleaved({"dense": lambda: dense.generate(short, **gen), "moe": lambda: moe.generate(short, **gen)},
                           repeats, 1, device)
    return ModelResult.from_medians(name, prompt_tokens, decode_tokens, pre, dec)


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] = lambda s: None) -> BenchResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    result = BenchResult(conditions(cfg))
    progress("ffn layer")
    result.ffn = bench_ffn(cfg)
    if cfg.model:
        result.model = bench_model(cfg, progress)
    return result


def format_result(result: BenchResult) -> str:
    c = result.conditions
    lines = [
        f"conditions: torch {c['torch']}, {c['threads']} threads, {c['device']}, {c['dtype']}, {c['machine']}; "
        f"{c['num_experts']} experts, top-{c['top_k']}; median of {c['repeats']} interleaved runs",
        "",
        "| hidden | ffn | tokens | dense ms | moe ms | mixtral ms | moe/dense | ideal | mixtral/dense | path |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result.ffn:
        lines.append(f"| {r.hidden} | {r.ffn} | {r.tokens} | {r.dense_ms:.3f} | {r.moe_ms:.3f} | "
                     f"{r.mixtral_ms:.3f} | {r.ratio:.3f} | {r.ideal_ratio:.3f} | {r.mixtral_ratio:.3f} | {r.path} |")
    m = result.model
    if m is not None:
        lines += [
            "",
            f"whole model {m.model} (median of {c.get('model_repeats', '?')} interleaved runs):",
            f"  prefill ({m.prompt_tokens} tokens): dense {m.dense_prefill_tok_s:.0f} tok/s, "
            f"moe {m.moe_prefill_tok_s:.0f} tok/s, speed-up {m.prefill_speedup:.2f}x",
            f"  decode ({m.decode_tokens} tokens, generate with KV cache): dense {m.dense_decode_tok_s:.1f} tok/s, "
            f"moe {m.moe_decode_tok_s:.1f} tok/s, speed-up {m.decode_speedup:.2f}x",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp (optional: pip install 'factorllm[llamacpp]', which compiles llama.cpp)

@dataclass
class LlamaCppResult:
    speed: ModelResult
    gguf_type: str
    threads: int
    dense_text: str
    moe_text: str


def llamacpp_model(path: str, threads: int, n_ctx: int = 1024):
    try:
        from llama_cpp import Llama
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("the llama.cpp engine needs llama-cpp-python: pip install 'factorllm[llamacpp]' "
                                  "(it compiles llama.cpp: about 11 minutes on 2 cores)") from err
    return Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                 verbose=False)


def llamacpp_greedy(llm, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Greedy continuation of `prompt` for n tokens, and the seconds the n decode steps took."""
    import numpy as np

    def last_logits():
        # NOTE: llama-cpp-python no longer copies logits into `llm.scores` unless logits_all=True (which
        # computes every position's logits); the context holds the last position's.
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))

    llm.reset()
    llm.eval(prompt)
    out = []
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(last_logits()))
        out.append(tok)
        llm.eval([tok])
    return out, time.perf_counter() - t0


def bench_llamacpp(dense_gguf: str, moe_gguf: str, tokenizer, gguf_type: str, threads: int,
                   prompt_tokens: int = 512, decode_tokens: int = 32, repeats: int = 5,
                   text_prompt: str = "The Python for statement") -> LlamaCppResult:
    """Dense GGUF against MoE GGUF in llama.cpp, interleaved: prefill and decode tokens/s, medians."""
    dense, moe = llamacpp_model(dense_gguf, threads), llamacpp_model(moe_gguf, threads)
    vocab = dense.n_vocab()
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()

    def prefill(llm):
        llm.reset()
        llm.eval(prompt)

    pre = time_interleaved({"dense": lambda: prefill(dense), "moe": lambda: prefill(moe)}, repeats, 1, "cpu")
    times: dict[str, list[float]] = {"dense": [], "moe": []}
    for _ in range(repeats):
        for name, llm in (("dense", dense), ("moe", moe)):
            times[name].append(llamacpp_greedy(llm, prompt[:16], decode_tokens)[1])
    dec = {k: statistics.median(v) * 1e3 for k, v in times.items()}  # ms
    ids = tokenizer(text_prompt, add_special_tokens=False)["input_ids"]
    texts = {name: tokenizer.decode(llamacpp_greedy(llm, ids, decode_tokens)[0])
             for name, llm in (("dense", dense), ("moe", moe))}
    for llm in (dense, moe):
        llm.close()  # NOTE: freeing at interpreter exit instead raises inside llama-cpp-python
    speed = ModelResult.from_medians(Path(moe_gguf).name, prompt_tokens, decode_tokens, pre, dec)
    return LlamaCppResult(speed, gguf_type, threads, texts["dense"], texts["moe"])
