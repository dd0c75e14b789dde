"""Training: routers with the Prior-Approximate loss, then experts, from little data. One loop for all of it.

Two ways to feed the loop:
- `layerwise`: the dense teacher runs once over the training tokens; each layer's FFN input and output are
  cached, and each MoE block trains alone on them (no backward pass through the network: minutes on a CPU).
- `end2end`: the whole student runs; router and output losses of every layer are summed and back-propagated,
  optionally with logit distillation from the teacher and the LM loss.

The loop runs on Accelerate (CPU here; `accelerate launch` with DDP/FSDP/DeepSpeed on GPUs), shows loss and
tokens/s, evaluates held-out perplexity, writes checkpoints atomically, resumes exactly (batches are a pure
function of the step), and stops with a clear message on a non-finite loss, keeping the last good checkpoint.

The same loop fine-tunes activation-sparse FFNs (`factorllm.sparsify_`): they have no router, and their weights
train as experts do (`train_router=False, train_experts=True`).

Legend: B windows, S tokens per window, T tokens, D hidden, E experts, k experts per token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from factorllm import losses
from factorllm.adapters import adapter_for, find_ffns
from factorllm.moe import MoEFeedForward, moe_layers
from factorllm.router import RouterOutput
from factorllm.sparsity import SparseFFN
from factorllm.tracing import collect, trace_inputs

MODES = ("layerwise", "end2end")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    """What to train, with which losses, for how long.

    Args:
        mode: `layerwise` (each MoE block alone on cached dense activations) or `end2end`.
        train_router / train_experts: which parameters get gradients (the rest of the model is frozen).
        pseudo_label: PA label rule from `factorllm.losses.PSEUDO_LABELS` (`factorllm`, `norm`, `lstsq`).
        pa_weight, bce_weight: router losses against the pseudo-labels (PA: KL; BCE: per expert).
        switch_weight, ref_balance_weight: Switch-style and the reference code's balance terms.
        recon_weight: layerwise only: the block's output against the dense FFN's (relative squared error).
        lm_weight, distill_weight: end2end only: next-token loss and KL to the teacher's logits.
        chooser_weight, chooser_lr: activation-sparse FFNs with a learned chooser (`factorllm.fit_chooser_`):
            train it along, on each block's own input in this run, with `losses.chooser_loss` at this weight
            and its own rate (None: `lr`), so that it keeps choosing well as the FFN weights change (0: frozen).
        chooser_tokens: the tokens of a step each block's chooser loss reads, evenly spaced over the batch (the
            loss costs about eight input-projection products on them: on all 1024 tokens of a SmolLM2 end-to-end
            step it made the step a third longer).
        straight_through: hard gating passes the chosen experts' probabilities' gradient to the router.
        lr, router_lr: the learning rate, and the routers' own where it differs (None: `lr`); end-to-end
            fine-tuning of experts wants a small rate, their freshly trained routers a larger one.
        cache_teacher: end2end distillation: keep each training window's teacher hidden states (S x D floats a
            window), so a window seen again costs the teacher's output head only, not its whole forward.
        max_steps: optimizer steps (per layer in layerwise mode).
        batch_size: windows per step (end2end); token_batch: tokens per step (layerwise).
        layerwise_tokens: training tokens whose activations are cached in layerwise mode.
        save_every, eval_every: in steps; 0 turns them off. output_dir: where checkpoints go.
    """

    mode: str = "layerwise"
    train_router: bool = True
    train_experts: bool = False
    pseudo_label: str = "norm"
    pa_weight: float = 1.0
    bce_weight: float = 0.0
    switch_weight: float = 0.0
    ref_balance_weight: float = 0.0
    recon_weight: float = 0.0
    lm_weight: float = 0.0
    distill_weight: float = 0.0
    chooser_weight: float = 0.0
    chooser_lr: float | None = None
    chooser_tokens: int = 256
    straight_through: bool = False
    cache_teacher: bool = True
    lr: float = 1e-3
    router_lr: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    max_steps: int = 100
    batch_size: int = 4
    token_batch: int = 1024
    layerwise_tokens: int = 16384
    grad_clip: float = 1.0
    eval_every: int = 0
    save_every: int = 50
    output_dir: str | None = None
    resume: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; choose one of {MODES}")
        if not (self.train_router or self.train_experts):
            raise ValueError("nothing to train: set train_router and/or train_experts")
        losses.PSEUDO_LABELS.get(self.pseudo_label)
        weights = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.endswith("_weight")}
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"loss weights must be >= 0, got {weights}")
        if self.mode == "layerwise" and (self.lm_weight or self.distill_weight):
            raise ValueError("lm_weight and distill_weight need mode='end2end' (layerwise sees one FFN at a time)")
        if self.mode == "end2end" and self.recon_weight:
            raise ValueError("recon_weight needs mode='layerwise'; end2end uses distill_weight or lm_weight")
        router_terms = self.pa_weight + self.bce_weight + self.lm_weight + self.distill_weight
        expert_terms = self.recon_weight + self.lm_weight + self.distill_weight
        if self.train_router and not router_terms:
            raise ValueError("train_router needs pa_weight, bce_weight, lm_weight or distill_weight > 0")
        if self.train_experts and not expert_terms:
            raise ValueError("train_experts needs recon_weight (layerwise), distill_weight or lm_weight > 0")
        rates = {"lr": self.lr, "router_lr": self.router_lr, "chooser_lr": self.chooser_lr}
        if any(r is not None and r <= 0 for r in rates.values()):
            raise ValueError(f"learning rates must be > 0, got {rates}")
        for name in ("max_steps", "batch_size", "token_batch", "layerwise_tokens", "chooser_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.resume and not self.output_dir:
            raise ValueError("resume needs output_dir (where the checkpoint is)")

    def fingerprint(self) -> str:
        """What must match for a checkpoint to be resumed: everything but cadence, paths and the resume flag."""
        keep = {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("resume", "output_dir", "eval_every", "save_every", "cache_teacher")}
        return json.dumps(keep, sort_keys=True)


@dataclass
class TrainData:
    """Token windows: `train` [N, S] and `heldout` [M, S] (M may be 0)."""

    train: torch.Tensor
    heldout: torch.Tensor = field(default_factory=lambda: torch.empty(0, 2, dtype=torch.long))

    def __post_init__(self) -> None:
        if self.train.dim() != 2 or self.train.shape[0] == 0 or self.train.shape[1] < 2:
            raise ValueError(f"training data must be windows [N >= 1, S >= 2], got shape {tuple(self.train.shape)}; "
                             "give more text or a smaller window")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one row per logged step
    evals: list[dict] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------------------
# Routing targets

@torch.no_grad()
def pa_labels(block: MoEFeedForward, teacher_ffn: nn.Module, x: torch.Tensor, method: str) -> torch.Tensor:
    """Pseudo-labels [T, E] for a block's routed experts on its real input x [T, D]: targets, no gradient.

    The target is the dense teacher FFN's output on the same input, minus what the routed experts do not
    carry (the shared expert and the output bias).
    """
    if method == "norm":  # NOTE: needs the experts' output norms only, not [T, E, D] outputs or the teacher
        return losses.top_k_mask(block.experts.output_norms(x), block.router.top_k)
    outs = block.experts.all_outputs(x)  # [T, E, D]
    y = teacher_ffn(x)  # [T, D]
    if block.shared is not None:
        y = y - block.shared.expert(0, x)
    if block.b_out is not None:
        y = y - block.b_out
    return losses.PSEUDO_LABELS.get(method)(outs, y, block.router.top_k)


class TeacherLogits:
    """The dense teacher's logits for training windows [B, S] -> [B, S, V], for logit distillation.

    With `cache=True` each window's last hidden states [S, D] are kept the first time it is seen, so a window seen
    again costs the output head only: the teacher's body is ~80% of its forward's FLOPs and the end-to-end stage
    revisits its windows (SmolLM2: 64 windows, 200 steps of 2). Windows run one at a time, so a window's hidden
    states do not depend on the batch it first came in (a resumed run computes the same logits as an uninterrupted
    one).

    NOTE: the cache assumes logits = output_head(base_model(...).last_hidden_state); the first window checks it
    against the full forward, and a model that scales or caps its logits falls back to full forwards.
    """

    def __init__(self, teacher: nn.Module, cache: bool) -> None:
        self.teacher = teacher
        self.head = teacher.get_output_embeddings() if cache else None
        self.hidden: dict[int, torch.Tensor] | None = {} if self.head is not None else None  # window -> [S, D]

    @torch.no_grad()
    def __call__(self, windows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """windows: [B] indices of the batch's windows in the training data; ids: [B, S] their tokens."""
        if self.hidden is None:
            return self.teacher(input_ids=ids, use_cache=False).logits
        for w, row in zip(windows.tolist(), ids, strict=True):
            if w not in self.hidden:
                h = self.teacher.base_model(input_ids=row[None], use_cache=False).last_hidden_state[0]  # [S, D]
                if not self.hidden and not self._head_reproduces(row, h):
                    self.hidden = None  # from now on: full forwards
                    return self.teacher(input_ids=ids, use_cache=False).logits
                self.hidden[w] = h
        return self.head(torch.stack([self.hidden[w] for w in windows.tolist()]))  # [B, S, V]

    def _head_reproduces(self, row: torch.Tensor, h: torch.Tensor) -> bool:
        full = self.teacher(input_ids=row[None], use_cache=False).logits[0]  # [S, V]
        return torch.allclose(self.head(h), full, rtol=1e-4, atol=1e-4)


@dataclass
class LayerTrace:
    inputs: torch.Tensor | None = None  # [T, D]
    routing: RouterOutput | None = None


@contextmanager
def trace_routing(model: nn.Module) -> Iterator[list[LayerTrace]]:
    """Records each MoE block's input and router output during a forward pass (hooks, removed on exit).

    The list is owned by the caller: nothing is stashed in globals or on the modules.
    """
    layers = moe_layers(model)
    traces = [LayerTrace() for _ in layers]
    handles = []
    for (_, block), trace in zip(layers, traces, strict=True):
        def pre(_m, args, trace=trace):
            trace.inputs = args[0].reshape(-1, args[0].shape[-1])

        def post(_m, _args, out, trace=trace):
            trace.routing = out

        handles += [block.register_forward_pre_hook(pre), block.router.register_forward_hook(post)]
    try:
        yield traces
    finally:
        for h in handles:
            h.remove()


def routing_targets(model: nn.Module, teacher: nn.Module, ids: torch.Tensor, method: str) -> list[torch.Tensor]:
    """PA labels of every layer for a batch of ids [B, S], each from that layer's real input in the student."""
    blocks = [b for _, b in moe_layers(model)]
    teacher_ffns = teacher_ffns_of(moe_layers(model), teacher)
    with torch.no_grad(), trace_routing(model) as traces:
        model(input_ids=ids, use_cache=False)
    return [pa_labels(b, t, tr.inputs, method) for b, t, tr in zip(blocks, teacher_ffns, traces, strict=True)]


def router_loss(cfg: TrainConfig, logits: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor | None,
                top_k: int) -> torch.Tensor:
    loss = logits.new_zeros(())
    if cfg.pa_weight:
        loss = loss + cfg.pa_weight * losses.pa_loss(logits, labels)
    if cfg.bce_weight:
        loss = loss + cfg.bce_weight * losses.router_bce_loss(logits, labels)
    if cfg.switch_weight:
        loss = loss + cfg.switch_weight * losses.switch_balance_loss(logits, indices)
    if cfg.ref_balance_weight:
        loss = loss + cfg.ref_balance_weight * losses.reference_balance_loss(logits, top_k)
    return loss


# ---------------------------------------------------------------------------------------------------------------
# Checks

def check_teacher(model: nn.Module, teacher: nn.Module) -> None:
    """The teacher must be the dense model the student was cut from (same shapes everywhere)."""
    s, t = model.config, teacher.config
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if getattr(s, key, None) != getattr(t, key, None):
            raise ValueError(f"teacher does not match the student: {key} {getattr(t, key, None)} != "
                             f"{getattr(s, key, None)}; pass the dense model the student was converted from")
    try:
        teacher_ffns = dict(find_ffns(teacher))
    except ValueError as err:
        raise ValueError(f"the teacher must be the dense model: {err}") from err
    for name, block in ffn_blocks(model):
        if name not in teacher_ffns:
            raise ValueError(f"teacher does not match the student: it has no FFN at {name}; pass the dense model "
                             "the student was converted from")
        ffn = teacher_ffns[name]
        width = adapter_for(ffn).read(ffn).width
        got = block.width if isinstance(block, SparseFFN) else len(block.neuron_index)
        if got != width:
            raise ValueError(f"teacher does not match the student at {name}: FFN width {width} != {got}; pass the "
                             "dense model the student was converted from")


def teacher_ffns_of(blocks: Sequence[tuple[str, nn.Module]], teacher: nn.Module) -> list[nn.Module]:
    """The teacher's dense FFN for each `(name, block)` of the student, in order (matched by module name: layers
    kept dense, `FactorConfig.dense_layers`, have no block)."""
    return [teacher.get_submodule(name) for name, _ in blocks]


def ffn_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(qualified name, block)` of every trainable FFN block, in layer order: MoE blocks (`factorllm.convert_`)
    and activation-sparse FFNs (`factorllm.sparsify_`)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (MoEFeedForward, SparseFFN))]


def choosers_of(model: nn.Module) -> list[SparseFFN]:
    """The activation-sparse blocks with a learned chooser (`factorllm.fit_chooser_`), in layer order."""
    return [b for _, b in ffn_blocks(model) if isinstance(b, SparseFFN) and b.chooser_in is not None]


def _check_window(model: nn.Module, data: TrainData) -> None:
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and data.train.shape[1] > max_pos:
        raise ValueError(f"window {data.train.shape[1]} is longer than the model's context ({max_pos}); "
                         f"use a window <= {max_pos}")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints

class Checkpointer:
    """One file, `output_dir/checkpoint.pt`, replaced atomically; refuses a checkpoint of another run."""

    def __init__(self, output_dir: str | None, fingerprint: str) -> None:
        self.path = None if output_dir is None else Path(output_dir) / "checkpoint.pt"
        self.fingerprint = fingerprint

    def save(self, state: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint.", dir=self.path.parent)
        os.close(fd)
        try:
            torch.save({**state, "fingerprint": self.fingerprint}, tmp)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self) -> dict | None:
        if self.path is None or not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(f"{self.path} was written by a different training config or model; resume with the "
                             "same config, or use another output_dir")
        return state


def _fingerprint(model: nn.Module, cfg: TrainConfig, data: TrainData) -> str:
    blocks = [(n, b.experts.sizes, b.router.gating, b.router.top_k) if isinstance(b, MoEFeedForward)
              else (n, b.input_keep, b.neuron_keep, b.chooser_in is not None) for n, b in ffn_blocks(model)]
    digest = hashlib.sha256(data.train.numpy().tobytes()).hexdigest()[:16]
    return json.dumps({"config": cfg.fingerprint(), "blocks": blocks, "data": digest})


# ---------------------------------------------------------------------------------------------------------------
# The loop

def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


def _run_loop(accelerator, module: nn.Module, groups: list[dict], batch_fn: Callable[[int], object],
              loss_fn: Callable[[object], tuple[torch.Tensor, int]], cfg: TrainConfig, ckpt: Checkpointer,
              state: dict, result: TrainResult, desc: str, callbacks: Sequence[Callable[[int, dict], None]],
              eval_fn: Callable[[], dict] | None = None, resume_from: dict | None = None,
              progress: bool = True) -> None:
    """The training loop: step = batch_fn(step) -> loss_fn -> backward -> clip -> AdamW -> cosine schedule.

    `groups`: AdamW parameter groups (`params`, and `lr` where it is not `cfg.lr`), see `_param_groups`.
    """
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    start = 0
    if resume_from is not None:
        opt.load_state_dict(resume_from["optimizer"])
        sched.load_state_dict(resume_from["scheduler"])
        start = resume_from["step"]
    opt = accelerator.prepare(opt)
    bar = tqdm(range(start, cfg.max_steps), desc=desc, initial=start, total=cfg.max_steps,
               disable=not progress or not accelerator.is_main_process, leave=False)
    tokens, t0 = 0, time.perf_counter()
    for step in bar:
        loss, n_tok = loss_fn(batch_fn(step))
        if not torch.isfinite(loss):
            where = f"; the last good checkpoint is kept at {ckpt.path}" if ckpt.path else ""
            raise TrainingDiverged(f"{desc}: loss is {loss.item()} at step {step}{where}. Lower the learning "
                                   f"rate (lr={cfg.lr}) or the loss weights, then resume")
        accelerator.backward(loss)
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += n_tok
        value = accelerator.reduce(loss.detach(), "mean").item()
        row = {"stage": desc, "step": step + 1, "loss": value, "lr": sched.get_last_lr()[0]}
        result.history.append(row)
        bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            result.evals.append({"stage": desc, "step": step + 1, **eval_fn()})
        done = step + 1 == cfg.max_steps
        if cfg.save_every and ((step + 1) % cfg.save_every == 0 or done):
            ckpt.save({**state, "step": step + 1, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                       "params": _trainable_state(module), "history": result.history})
        for cb in callbacks:
            cb(step + 1, row)


def _spaced(x: torch.Tensor, n: int) -> torch.Tensor:
    """About n of the rows of x [T, D], evenly spaced (a pure function of the batch, so a resumed run sees what
    an uninterrupted one did)."""
    return x[:: max(1, x.shape[0] // n)]


def _trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    module = getattr(module, "module", module)  # unwrap DDP
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _set_trainable(model: nn.Module, cfg: TrainConfig) -> None:
    """Freezes everything but what `cfg` trains: the routers and/or the experts (shared expert included; an
    activation-sparse FFN's weights count as experts)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, block in ffn_blocks(model):
        if isinstance(block, SparseFFN):
            block.requires_grad_(cfg.train_experts)
            for p in (block.chooser_in, block.chooser_up):  # only the chooser loss reaches it (it only chooses)
                if p is not None:
                    p.requires_grad_(cfg.chooser_weight > 0)
    for _, block in moe_layers(model):
        block.router.straight_through = cfg.straight_through
        for p in block.router.parameters():
            p.requires_grad_(cfg.train_router)
        for group in (block.experts, block.shared):  # NOTE: the output bias stays as the dense FFN had it
            for p in group.parameters() if group is not None else ():
                p.requires_grad_(cfg.train_experts)


def _param_groups(blocks: Sequence[nn.Module], cfg: TrainConfig) -> list[dict]:
    """AdamW groups of the blocks' trainable parameters: the routers' (at `router_lr` where set), the learned
    choosers' (at `chooser_lr` where set), the rest."""
    router = [p for b in blocks if isinstance(b, MoEFeedForward) for p in b.router.parameters() if p.requires_grad]
    chooser = [p for b in blocks if isinstance(b, SparseFFN) for p in (b.chooser_in, b.chooser_up)
               if p is not None and p.requires_grad]
    ids = {id(p) for p in router + chooser}
    rest = [p for b in blocks for p in b.parameters() if p.requires_grad and id(p) not in ids]
    rate = lambda r: {"lr": r} if r is not None else {}  # noqa: E731
    groups = [{"params": router, **rate(cfg.router_lr)}, {"params": chooser, **rate(cfg.chooser_lr)},
              {"params": rest}]
    return [g for g in groups if g["params"]]


# ---------------------------------------------------------------------------------------------------------------
# Entry point

def train(model: nn.Module, teacher: nn.Module, data: TrainData | torch.Tensor, cfg: TrainConfig,
          callbacks: Sequence[Callable[[int, dict], None]] = (), progress: bool = True) -> TrainResult:
    """Trains a factorized model's routers and/or experts in place; the rest of the model stays frozen.

    Args:
        model: a model factorized by `factorllm.convert_`.
        teacher: the dense model it was converted from (frozen; gives PA labels, FFN targets and logits).
        data: `TrainData`, or training windows [N, S].
        cfg: the `TrainConfig`.
        callbacks: called as fn(step, row) after every step (logging, early stop by raising).

    Example:
        >>> cfg = TrainConfig(mode="layerwise", train_router=True, pseudo_label="norm", max_steps=200)
        >>> factorllm.train(student, dense, TrainData(windows), cfg)
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    data = data if isinstance(data, TrainData) else TrainData(data)
    if not ffn_blocks(model):
        raise ValueError("the model is not factorized; call factorllm.convert_ (or factorllm.sparsify_) first")
    if cfg.train_router and not moe_layers(model):
        raise ValueError("the model has no routers (its FFNs are activation-sparse: factorllm.sparsify_); set "
                         "train_router=False and train_experts=True")
    if cfg.chooser_weight and not choosers_of(model):
        raise ValueError("chooser_weight > 0 trains learned choosers, and the model has none; fit them first with "
                         "factorllm.fit_chooser_ (exact-neuron activation sparsity), or set chooser_weight=0")
    if any(b.router.gating == "oracle" for _, b in moe_layers(model)):
        raise ValueError("the oracle gating has no router to train; set a real gating with factorllm.set_routing_")
    check_teacher(model, teacher)
    _check_window(model, data)
    torch.manual_seed(cfg.seed)
    # NOTE: cpu=True where there is no accelerator, so that processes started by `accelerate launch` (torchrun)
    # form a gloo process group instead of running alone.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    teacher.eval().requires_grad_(False)
    ckpt = Checkpointer(cfg.output_dir, _fingerprint(model, cfg, data))
    resume = ckpt.load() if cfg.resume else None
    if resume is not None:
        with torch.no_grad():
            named = dict(model.named_parameters())
            for name, value in resume["params"].items():
                named[name].copy_(value)
    _set_trainable(model, cfg)
    result = TrainResult(history=list(resume["history"]) if resume else [])
    t0 = time.perf_counter()
    run = _train_layerwise if cfg.mode == "layerwise" else _train_end2end
    run(accelerator, model, teacher, data, cfg, ckpt, resume, result, callbacks, progress)
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result


def _eval_fn(model: nn.Module, data: TrainData) -> Callable[[], dict] | None:
    if data.heldout.shape[0] == 0:
        return None
    from factorllm.evaluate import perplexity

    return lambda: {"heldout_ppl": perplexity(model, data.heldout.reshape(-1), window=data.heldout.shape[1])}


def _train_end2end(accelerator, model, teacher, data, cfg, ckpt, resume, result, callbacks, progress):
    blocks = [b for _, b in moe_layers(model)]  # the routed ones
    teacher_ffns = teacher_ffns_of(moe_layers(model), teacher)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {world} processes")
    model.train()
    wrapped = accelerator.prepare(model)
    n = data.train.shape[0]

    def batch_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        # A pure function of the step: epoch-seeded permutation, then this process's share of the batch, as
        # (window indices [B / world], their ids [B / world, S]).
        per_epoch = max(1, n // cfg.batch_size)
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        idx = perm[(i * cfg.batch_size) % n:][: cfg.batch_size]
        if len(idx) < cfg.batch_size:  # fewer windows than one batch: wrap around
            idx = perm.repeat(cfg.batch_size // n + 1)[: cfg.batch_size]
        share = cfg.batch_size // world
        mine = idx[rank * share:(rank + 1) * share]  # [B / world]
        return mine, data.train[mine].to(accelerator.device)

    teacher_logits = TeacherLogits(teacher, cfg.cache_teacher)

    choosers = choosers_of(model) if cfg.chooser_weight else []

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        windows, ids = batch
        with trace_routing(model) as traces, trace_inputs(choosers) as chooser_inputs:
            out = wrapped(input_ids=ids, use_cache=False)
        loss = out.logits.new_zeros(())
        if cfg.lm_weight:
            loss = loss + cfg.lm_weight * losses.lm_loss(out.logits, ids)
        if cfg.distill_weight:
            loss = loss + cfg.distill_weight * losses.distill_loss(out.logits, teacher_logits(windows, ids))
        if cfg.train_router and (cfg.pa_weight or cfg.bce_weight or cfg.switch_weight or cfg.ref_balance_weight):
            # NOTE: labels come from each layer's own input in this very forward pass (the reference code
            # used the previous layer's FFN output) and cover every sequence of the batch.
            for block, ffn, tr in zip(blocks, teacher_ffns, traces, strict=True):
                labels = pa_labels(block, ffn, tr.inputs.detach(), cfg.pseudo_label) \
                    if (cfg.pa_weight or cfg.bce_weight) else None
                loss = loss + router_loss(cfg, tr.routing.logits, tr.routing.indices, labels, block.router.top_k)
        if choosers:  # each learned chooser on its block's input in this pass (mean over blocks)
            loss = loss + cfg.chooser_weight * sum(
                b.chooser_error(_spaced(x, cfg.chooser_tokens)) for b, x in zip(choosers, chooser_inputs, strict=True)
            ) / len(choosers)
        return loss, ids.numel()

    state = {"layer": None}
    groups = _param_groups([b for _, b in ffn_blocks(model)], cfg)
    _run_loop(accelerator, wrapped, groups, batch_fn, loss_fn, cfg, ckpt, state, result,
              "end2end", callbacks, _eval_fn(model, data), resume, progress)


@torch.no_grad()
def cache_ffn_activations(teacher: nn.Module, windows: torch.Tensor, batch: int = 4, progress: bool = True,
                          names: Sequence[str] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each dense FFN's real input and output on the windows: a list over layers of (x [T, D], y [T, D]).

    `names`: only the FFNs of these qualified names, in this order (default: every layer's).
    """
    ffns = find_ffns(teacher) if names is None else [(n, teacher.get_submodule(n)) for n in names]
    xs, ys = collect(teacher, [m for _, m in ffns], windows, batch, with_outputs=True, progress=progress)
    return list(zip(xs, ys, strict=True))


def _train_layerwise(accelerator, model, teacher, data, cfg, ckpt, resume, result, callbacks, progress):
    layers = ffn_blocks(model)
    teacher_ffns = teacher_ffns_of(layers, teacher)
    numbers = {name: i for i, (name, _) in enumerate(find_ffns(teacher))}  # dense layers have no block
    n_windows = max(1, min(data.train.shape[0], cfg.layerwise_tokens // data.train.shape[1]))
    cache = cache_ffn_activations(teacher, data.train[:n_windows], progress=progress,
                                  names=[name for name, _ in layers])
    choosers = choosers_of(model) if cfg.chooser_weight else []
    first = 0 if resume is None else resume["layer"]
    for li in tqdm(range(first, len(layers)), desc="layers", disable=not progress or not accelerator.is_main_process):
        name, block = layers[li]
        x_all, y_all = cache[li]
        block.train()

        def batch_fn(step: int, li=li, x_all=x_all, y_all=y_all):
            g = torch.Generator().manual_seed(cfg.seed * 100_003 + li * 1_009 + step)
            idx = torch.randint(0, x_all.shape[0], (min(cfg.token_batch, x_all.shape[0]),), generator=g)
            return x_all[idx], y_all[idx]

        def loss_fn(batch, block=block, ffn=teacher_ffns[li]):
            x, y = batch
            loss = x.new_zeros(())
            routed = isinstance(block, MoEFeedForward)
            if routed and (cfg.train_router or cfg.switch_weight or cfg.ref_balance_weight):
                rout = block.router(x)
                labels = pa_labels(block, ffn, x, cfg.pseudo_label) if (cfg.pa_weight or cfg.bce_weight) else None
                loss = loss + router_loss(cfg, rout.logits, rout.indices, labels, block.router.top_k)
            if cfg.recon_weight:
                loss = loss + cfg.recon_weight * losses.reconstruction_loss(block(x[None])[0], y)
            if any(block is c for c in choosers):
                loss = loss + cfg.chooser_weight * block.chooser_error(_spaced(x, cfg.chooser_tokens))
            return loss, x.shape[0]

        state = {"layer": li}
        # A checkpoint written mid-layer carries that layer's optimizer; one written between layers does not.
        layer_resume = resume if (resume is not None and li == first and resume["optimizer"] is not None) else None
        _run_loop(accelerator, block, _param_groups([block], cfg), batch_fn, loss_fn, cfg,
                  _LayerCheckpointer(ckpt, model), state, result, f"layer {numbers[name]}", callbacks, None,
                  layer_resume, progress)
        block.eval()
        # Mark the layer done, so a resume starts at the next one.
        ckpt.save({"layer": li + 1, "step": 0, "optimizer": None, "scheduler": None,
                   "params": _trainable_state(model), "history": result.history})


class _LayerCheckpointer(Checkpointer):
    """Within a layer: saves the whole model's trainable state (earlier layers included), not just the block's."""

    def __init__(self, inner: Checkpointer, model: nn.Module) -> None:
        super().__init__(None, inner.fingerprint)
        self.inner, self.model, self.path = inner, model, inner.path

    def save(self, state: dict) -> None:
        self.inner.save({**state, "params": _trainable_state(self.model)})
