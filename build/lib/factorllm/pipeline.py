"""`factorllm run`: from the dense model to a measured quality-versus-speed report, resumably.

Every step writes its result into the output folder atomically and is skipped when its file is already there,
so an interrupted run picks up where it stopped. Steps: dense evaluation; then for each k: convert, train
(router, then experts), evaluate (trained and oracle routing); then timings; then `results.json`,
`report.md` and the plots.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from factorllm.config import FactorConfig
from factorllm.serialization import atomic_write_text


@dataclass(frozen=True)
class RunConfig:
    """A whole `factorllm run`. `preset` picks defaults; any field given explicitly wins."""

    model: str = "smollm2-135m"
    experts: int = 8
    top_ks: tuple[int, ...] = (2, 4)
    partition: str = "importance"
    gating: str = "sum"
    calib_tokens: int = 4096
    train_tokens: int = 8192
    router_steps: int = 60
    expert_steps: int = 30
    eval_windows: int = 4
    cloze: int = 32
    task_limit: int | None = None
    bench_repeats: int = 3
    decode_tokens: int = 16
    window: int = 512

    def __post_init__(self) -> None:
        for k in self.top_ks:
            FactorConfig(self.experts, k, partition=self.partition, gating=self.gating)  # validates

    def factor_config(self, k: int) -> FactorConfig:
        return FactorConfig(self.experts, k, partition=self.partition, gating=self.gating, router="linear_nobias")


PRESETS = {
    # under 5 minutes on a 2-core CPU
    "quick": dict(calib_tokens=2048, train_tokens=2048, router_steps=15, expert_steps=0, eval_windows=2, cloze=16,
                  task_limit=8, bench_repeats=2, decode_tokens=8),
    # under 45 minutes on a 2-core CPU
    "default": dict(calib_tokens=4096, train_tokens=16384, router_steps=150, expert_steps=60, eval_windows=8,
                    cloze=64, task_limit=None, bench_repeats=5, decode_tokens=32),
}


def run_config(preset: str = "default", **overrides) -> RunConfig:
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}; choose one of {sorted(PRESETS)}")
    return RunConfig(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})


class Steps:
    """Runs named steps once: a step whose JSON file exists is loaded instead of run."""

    def __init__(self, folder: Path, log: Callable[[str], None]) -> None:
        self.folder, self.log = folder, log

    def __call__(self, name: str, fn: Callable[[], dict]) -> dict:
        path = self.folder / f"{name}.json"
        if path.exists():
            self.log(f"[done] {name}")
            return json.loads(path.read_text())
        self.log(f"[run ] {name}")
        result = fn()
        atomic_write_text(path, json.dumps(result, indent=2))
        return result


def run(cfg: RunConfig, output: str | Path, log: Callable[[str], None] = print) -> dict:
    """Runs (or resumes) the whole pipeline into `output`; returns the results dict."""
    import torch

    from factorllm import evaluate
    from factorllm.benchmark import time_whole_model
    from factorllm.convert import convert_
    from factorllm.data import kjv_text, tokenize, windows
    from factorllm.loading import load_model
    from factorllm.moe import set_routing_
    from factorllm.report import write_report
    from factorllm.serialization import load, save
    from factorllm.train import TrainData, train

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    saved_cfg = out / "run_config.json"
    if saved_cfg.exists() and json.loads(saved_cfg.read_text()) != _jsonable(cfg):
        raise ValueError(f"{out} holds a run with another configuration ({saved_cfg}); use another --output")
    atomic_write_text(saved_cfg, json.dumps(_jsonable(cfg), indent=2))
    step = Steps(out, log)
    dense, tok = load_model(cfg.model)
    ev = dict(window=cfg.window, eval_windows=cfg.eval_windows, cloze=cfg.cloze, task_limit=cfg.task_limit)
    evaluate_model = lambda *a, **kw: evaluate.evaluate_model(*a, **kw)  # noqa: E731 (looked up at call time)
    dense_eval = step("eval_dense", lambda: evaluate_model(dense, tok, **ev))
    train_ids = tokenize(tok, kjv_text("train"), max_tokens=cfg.train_tokens + cfg.calib_tokens + 4 * cfg.window)
    calib = list(windows(train_ids, cfg.window, max(1, cfg.calib_tokens // cfg.window), seed=1).split(4))
    train_w = windows(train_ids, cfg.window, max(1, cfg.train_tokens // cfg.window), seed=0)

    configs = []
    for k in cfg.top_ks:
        name = f"e{cfg.experts}_k{k}"
        folder = out / name

        def build(k=k, folder=folder) -> dict:
            model = convert_(copy.deepcopy(dense), cfg.factor_config(k), calib=calib)
            minutes = 0.0
            for stage_cfg in _stages(cfg):
                res = train(model, dense, TrainData(train_w), stage_cfg)
                minutes += res.seconds / 60
            save(model, folder / "model", tok, overwrite=True)
            return {"train_minutes": minutes}

        built = step(f"{name}_train", build)
        model, _ = load(folder / "model")
        trained = step(f"{name}_eval", lambda model=model: evaluate_model(model, tok, **ev))
        oracle = step(f"{name}_eval_oracle", lambda model=model: evaluate_model(
            set_routing_(copy.deepcopy(model), gating="oracle"), tok, **{**ev, "cloze": 0}, tasks=[]))

        def timing(model=model) -> dict:
            r = time_whole_model(dense, model, cfg.window, cfg.decode_tokens, cfg.bench_repeats, name=cfg.model)
            return {"prefill_speedup": r.prefill_speedup, "decode_speedup": r.decode_speedup,
                    "threads": torch.get_num_threads(), "prompt_tokens": cfg.window,
                    "decode_tokens": cfg.decode_tokens}

        speed = step(f"{name}_bench", timing)
        configs.append({
            "name": name, "experts": cfg.experts, "top_k": k, "partition": cfg.partition, "gating": cfg.gating,
            "ffn_compute_fraction": k / cfg.experts, "ppl": trained["ppl"], "cloze": trained["cloze"],
            "accuracy": trained["accuracy"], "oracle_ppl": oracle["ppl"], "decode_speedup": speed["decode_speedup"],
            "prefill_speedup": speed["prefill_speedup"], "train_minutes": built["train_minutes"],
            "routing": trained.get("routing", []),
        })
    results = {
        "model": cfg.model, "config": _jsonable(cfg),
        "dense": {"experts": None, "top_k": None, "partition": None, "ffn_compute_fraction": 1.0,
                  "ppl": dense_eval["ppl"], "cloze": dense_eval["cloze"], "accuracy": dense_eval["accuracy"],
                  "decode_speedup": 1.0, "prefill_speedup": 1.0},
        "configs": configs,
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    write_report(results, out)
    log(f"wrote {out / 'report.md'}, {out / 'results.json'} and plots")
    return results


def _stages(cfg: RunConfig):
    from factorllm.train import TrainConfig

    stages = [TrainConfig(mode="layerwise", pseudo_label="norm", pa_weight=1.0, lr=3e-3, max_steps=cfg.router_steps,
                          layerwise_tokens=cfg.train_tokens, save_every=0)] if cfg.router_steps else []
    if cfg.expert_steps:
        stages.append(TrainConfig(mode="layerwise", train_experts=True, pseudo_label="norm", pa_weight=1.0,
                                  recon_weight=1.0, lr=3e-4, max_steps=cfg.expert_steps,
                                  layerwise_tokens=cfg.train_tokens, save_every=0))
    return stages


def _jsonable(cfg: RunConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["top_ks"] = list(d["top_ks"])
    return d
