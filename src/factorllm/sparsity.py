"""Activation sparsity: each token runs only its largest inputs and neurons of a dense FFN (a TEAL/CATS-style
baseline on the same FFN machinery as factorization, with no router and no expert groups).

For each token:
1. the input projections (gate and up, or the plain FFN's input projection) read only the `input_keep` share of
   hidden channels with the largest |x_j| * ||W_in[:, j]|| (the columns they multiply: a channel's contribution);
2. the output projection reads only the `neuron_keep` share of neurons with the largest |h_i| * ||W_out[:, i]||.
Both choices are made per token from values the FFN computes anyway, so no predictor is needed; fine-tuning the
FFN weights end to end (`factorllm.train`, `train_router=False, train_experts=True`) adapts them to the masks.
With exact neurons (the input-sparse pass only chooses), `fit_chooser_` can fit that pass its own copy of the
input projections, which finds more of the exact top neurons at the same cost.

FFN compute per token (the multiply-adds that run, against the dense FFN's): gated (2 * input_keep + neuron_keep) / 3,
plain (input_keep + neuron_keep) / 2.

How it runs: up to KERNEL_MAX_TOKENS (32) tokens at inference on CPU (decoding), one call of a native kernel in which
each token reads only its kept weights (`native.SparseKernel`, csrc/moe_kernels.c; a SmolLM2 layer at 1 token:
~0.34 of the dense FFN's time at 50% compute). Otherwise (training, prefill, other devices), masks on dense matrix
products: the same numbers, at the dense products' cost plus the top-k (~1.5x dense at 512 tokens).
Per-token subsets do not batch into matrix products, so a prompt's prefill is slower than dense; inside
`dense_prefill(model)` calls of more than one position a sequence run the dense FFN instead (dense speed and
quality for the prompt, sparse decoding).

Legend: T tokens, D hidden, F FFN width.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from factorllm import native
from factorllm.adapters import FFNWeights, adapter_for, ffns_gated, find_ffns
from factorllm.losses import chooser_loss, distill_loss
from factorllm.tracing import collect

# Up to this many tokens a call runs the native kernel (each token reads only its kept weights); more run the
# masked dense products, which batch the tokens into matrix products. Measured (2 threads, SmolLM2's and
# TinyLlama's FFN shapes, 50% and 25% exact; benchmarks/results/oneoff_sparse_kernel_tokens.json): the kernel is
# faster than the masked path up to 32 tokens in every case, and than dense up to 6-8 (0.55 / 0.40) or 16 (25%).
KERNEL_MAX_TOKENS = 32

# The input shares `choose_input_keep` tries by default.
INPUT_KEEP_GRID = tuple(round(0.05 * i, 2) for i in range(2, 19))  # 0.10, 0.15, ..., 0.90


@dataclass(frozen=True)
class SparsityConfig:
    """How much of each token's FFN runs.

    Args:
        input_keep: share of hidden channels the input projections read, in (0, 1].
        neuron_keep: share of the FFN's neurons the output projection reads, in (0, 1].
        dense_layers: decoder layers (0-based) whose FFN stays dense.
        exact_neurons: the input-sparse pass only chooses the neurons; the chosen ones are then computed on the
            full input (their gate, up and down rows: each costs a whole neuron), instead of using the
            input-sparse values as they are.

    Example:
        >>> SparsityConfig.for_compute(0.5, input_keep=0.6)  # neuron_keep 0.3: (2 * 0.6 + 0.3) / 3 = 0.5
    """

    input_keep: float
    neuron_keep: float
    dense_layers: tuple[int, ...] = ()
    exact_neurons: bool = False

    def __post_init__(self) -> None:
        for name in ("input_keep", "neuron_keep"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name}={value!r} must be in (0, 1]: the share of channels or neurons kept")
        dense = tuple(sorted({int(i) for i in self.dense_layers}))
        if any(i < 0 for i in dense):
            raise ValueError(f"dense_layers={self.dense_layers} must be layer indices >= 0")
        object.__setattr__(self, "dense_layers", dense)

    def ffn_compute(self, gated: bool = True) -> float:
        """Share of a dense FFN's multiply-adds a sparse layer runs per token."""
        per_input, per_neuron = _costs(gated, self.exact_neurons)
        return per_input * self.input_keep + per_neuron * self.neuron_keep

    def mean_compute(self, num_layers: int, gated: bool = True) -> float:
        """Share of the dense FFN compute over a model's `num_layers` layers, the dense ones at 1."""
        n_dense = len(self.dense_layers)
        return (n_dense + (num_layers - n_dense) * self.ffn_compute(gated)) / num_layers

    @classmethod
    def for_compute(cls, fraction: float, input_keep: float, gated: bool = True,
                    dense_layers: tuple[int, ...] = (), num_layers: int | None = None,
                    exact_neurons: bool = False) -> SparsityConfig:
        """The config that runs `fraction` of the FFN compute, averaged over `num_layers` layers of which
        `dense_layers` run in full, with `input_keep` given: neuron_keep follows."""
        n_dense = len(set(dense_layers))
        if n_dense and num_layers is None:
            raise ValueError("dense_layers needs num_layers, to spread the compute over the sparse layers")
        sparse = fraction if not n_dense else (fraction * num_layers - n_dense) / (num_layers - n_dense)
        if sparse <= 0:
            raise ValueError(f"the {n_dense} dense layers alone run {n_dense / num_layers:.0%} of the FFN compute, at "
                             f"least fraction={fraction}: raise the fraction or keep fewer layers dense")
        per_input, per_neuron = _costs(gated, exact_neurons)
        neuron_keep = (sparse - per_input * input_keep) / per_neuron
        if not 0 < neuron_keep <= 1:
            lo, hi = (sparse - per_neuron) / per_input, sparse / per_input
            raise ValueError(f"{fraction:.0%} of the FFN compute with input_keep={input_keep} leaves neuron_keep="
                             f"{neuron_keep:.3f}, outside (0, 1]; choose input_keep in [{max(lo, 0):.3f}, "
                             f"{min(hi, 1):.3f})")
        return cls(input_keep, neuron_keep, tuple(dense_layers), exact_neurons)


def _costs(gated: bool, exact_neurons: bool) -> tuple[float, float]:
    """(compute per unit of input_keep, per unit of neuron_keep), as shares of the dense FFN.

    The input projections are 2 of a gated FFN's 3 matrices (1 of a plain FFN's 2); a kept neuron's value costs
    its share of the output projection, or, computed exactly on the full input, its whole row in every matrix."""
    per_input = 2 / 3 if gated else 1 / 2
    return per_input, 1.0 if exact_neurons else 1 - per_input


def top_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """A {0, 1} mask of the `keep` largest scores of each row: [T, N] -> [T, N] (exactly `keep` per row)."""
    if keep >= scores.shape[-1]:
        return torch.ones_like(scores)
    # NOTE: sorted=False: 2.4x faster on CPU at [1024, 1536] (9 against 22 ms); sorted top-k was 1.0 s of a profiled
    # 8.2 s SmolLM2 forward + backward at 2 x 512 tokens
    return torch.zeros_like(scores).scatter_(-1, scores.topk(keep, dim=-1, sorted=False).indices, 1.0)


class SparseFFN(nn.Module):
    """Drop-in replacement of a dense FFN module: `forward(hidden [..., D]) -> [..., D]`, masked per token.

    With `input_keep = neuron_keep = 1` it computes the dense FFN exactly. Its weights are copies of the dense
    FFN's in `nn.Linear` orientation, trainable like any parameter (masks pass gradient to what they keep).
    """

    def __init__(self, ffn: FFNWeights, input_keep: float, neuron_keep: float, exact_neurons: bool = False) -> None:
        super().__init__()
        self.gated, self.act = ffn.gated, ffn.act
        self.input_keep, self.neuron_keep, self.exact_neurons = input_keep, neuron_keep, exact_neurons
        param = lambda t: None if t is None else nn.Parameter(t.detach().clone())  # noqa: E731
        self.w_in, self.w_up, self.w_out = param(ffn.w_in), param(ffn.w_up), param(ffn.w_out)  # [F, D], [F, D], [D, F]
        self.b_in, self.b_up, self.b_out = param(ffn.b_in), param(ffn.b_up), param(ffn.b_out)
        # the learned chooser (`fit_chooser_`): copies of the input projections that only the input-sparse pass
        # reads, fitted to predict the exact neurons from the kept channels; None: that pass reads w_in and w_up
        self.register_parameter("chooser_in", None)  # [F, D]
        self.register_parameter("chooser_up", None)  # [F, D], gated only
        self._kernel: native.SparseKernel | None = None  # see `kernel`
        self.dense_prefill = False  # see `dense_prefill`: a runtime switch, never saved

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_kernel": None}  # a copy of the weights with raw pointers: copies rebuild

    @classmethod
    def from_dense(cls, mlp: nn.Module, config: SparsityConfig) -> SparseFFN:
        if any(True for _ in mlp.buffers()):
            raise ValueError(f"{type(mlp).__name__} holds buffers; SparseFFN rebuilds the dense module from its "
                             "weights alone (see `to_dense`), so it cannot take this FFN")
        block = cls(adapter_for(mlp).read(mlp), config.input_keep, config.neuron_keep, config.exact_neurons)
        # NOTE: the dense module's structure without its weights (meta tensors), kept outside the module tree so it
        # is neither a parameter nor saved: `to_dense` fills a copy with this block's weights
        object.__setattr__(block, "_dense_template", copy.deepcopy(mlp).to("meta"))
        return block

    def to_dense(self) -> nn.Module:
        """The dense FFN module this block came from, holding this block's (possibly fine-tuned) weights."""
        template = getattr(self, "_dense_template", None)
        if template is None:
            raise ValueError("this SparseFFN was built from FFNWeights, not from a module (SparseFFN.from_dense); "
                             "it has no dense module to write back to")
        mlp = copy.deepcopy(template).to_empty(device=self.w_in.device).to(self.w_in.dtype)
        target = adapter_for(mlp).read(mlp)  # views of mlp's parameters (transposed for GPT-2's Conv1D)
        with torch.no_grad():
            for name in ("w_in", "w_up", "w_out", "b_in", "b_up", "b_out"):
                src, dst = getattr(self, name), getattr(target, name)
                if (src is None) != (dst is None):
                    raise ValueError(f"{name}: the block and its dense module disagree on whether it exists")
                if dst is not None:
                    dst.copy_(src)
        return mlp

    @property
    def width(self) -> int:
        return self.w_in.shape[0]

    def weights(self) -> FFNWeights:
        return FFNWeights(self.gated, self.w_in, self.w_out, self.act, self.w_up, self.b_in, self.b_up, self.b_out)

    def chooser(self) -> FFNWeights:
        """The weights the input-sparse pass reads: the learned chooser's input projections where fitted (the
        biases and output projection stay the FFN's own), else the FFN's."""
        if self.chooser_in is None:
            return self.weights()
        return FFNWeights(self.gated, self.chooser_in, self.w_out, self.act, self.chooser_up, self.b_in, self.b_up,
                          self.b_out)

    def add_chooser(self) -> None:
        """Gives the block a learned chooser, initialised as copies of its input projections (so it chooses
        exactly as before until `fit_chooser_` fits it). Only with exact neurons: otherwise the input-sparse
        values are the FFN's output, not just a choice."""
        if not self.exact_neurons:
            raise ValueError("a learned chooser needs exact_neurons=True (SparsityConfig): without it the input-sparse "
                             "values are used as they are, so they must come from the FFN's own weights")
        copy_of = lambda t: None if t is None else nn.Parameter(t.detach().clone(), requires_grad=False)  # noqa: E731
        self.chooser_in, self.chooser_up = copy_of(self.w_in), copy_of(self.w_up)

    def kept_counts(self) -> tuple[int, int]:
        """(input channels, neurons) each token keeps."""
        return _count(self.input_keep, self.w_in.shape[1]), _count(self.neuron_keep, self.width)

    @torch.no_grad()
    def channel_norms(self) -> torch.Tensor:
        """||W_in[:, j]|| over the gate and up projections together: [D]; a channel's score is |x_j| times it."""
        return (self.w_in.square().sum(0) + (0 if self.w_up is None else self.w_up.square().sum(0))).sqrt()

    @torch.no_grad()
    def neuron_norms(self) -> torch.Tensor:
        """||W_out[:, i]||: [F]; a neuron's score is |h_i| times it."""
        return self.w_out.norm(dim=0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, D]
        if self.dense_prefill and not torch.is_grad_enabled() and hidden_states.dim() > 2 and shape[-2] > 1:
            return self.weights()(x).view(shape)  # a prompt's prefill (more than one position a sequence): dense
        keep_in, keep_h = self.kept_counts()
        if x.shape[0] <= KERNEL_MAX_TOKENS and not torch.is_grad_enabled():
            kernel = self.kernel(x)
            if kernel is not None:  # each token reads only its kept weights
                return kernel(x.contiguous(), keep_in, keep_h).view(shape)
        return self.forward_masked(x, keep_in, keep_h).view(shape)

    def sparse_input(self, x: torch.Tensor, keep_in: int) -> torch.Tensor:
        """x [T, D] with all but each token's `keep_in` channels of largest |x_j| * ||W_in[:, j]|| zeroed."""
        with torch.no_grad():  # the masks are choices, not functions to differentiate
            mask_in = top_mask(x.abs() * self.channel_norms(), keep_in)  # [T, D]
        return x * mask_in

    def chooser_error(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The learned chooser's loss on inputs x [T, D] (`losses.chooser_loss`): how far the values it gives from
        each token's kept channels are from the exact neuron values, `target` [T, F] (computed here when not
        given). Differentiable in the chooser's weights only."""
        if self.chooser_in is None:
            raise ValueError("the block has no learned chooser: call factorllm.fit_chooser_ (or add_chooser) first")
        if target is None:
            with torch.no_grad():
                target = self.weights().intermediate(x)  # [T, F]
        pred = self.chooser().intermediate(self.sparse_input(x.detach(), self.kept_counts()[0]))  # [T, F]
        return chooser_loss(pred, target, self.neuron_norms())

    def forward_masked(self, x: torch.Tensor, keep_in: int, keep_h: int) -> torch.Tensor:
        """The reference and training path: masks on dense products, x [T, D] -> [T, D]."""
        with torch.no_grad() if self.exact_neurons else contextlib.nullcontext():  # exact: the pass only chooses
            h = self.chooser().intermediate(self.sparse_input(x, keep_in))  # [T, F]
            mask_h = top_mask(h.detach().abs() * self.neuron_norms(), keep_h)  # [T, F]
        if self.exact_neurons:
            h = self.weights().intermediate(x)  # the chosen neurons' values on the full input (masked below)
        return nn.functional.linear(h * mask_h, self.w_out, self.b_out)

    def kernel(self, x: torch.Tensor) -> native.SparseKernel | None:
        """The native kernel for these weights, or None where it does not apply (then: the masked path): the
        kernels built, float32 CPU weights and input, an activation the kernels have. Rebuilt after the weights
        change (it holds a transposed copy)."""
        if not native.available() or x.dtype is not torch.float32 or not x.is_cpu:
            return None
        if (self._kernel is not None and self._kernel.key == native.sparse_key(self)
                and self._kernel.exact == self.exact_neurons):
            return self._kernel
        act = native.act_code(self.act)
        if act is None or any(p.dtype is not torch.float32 or not p.is_cpu for p in self.parameters()):
            return None
        self._kernel = native.SparseKernel(self, act)
        return self._kernel

    def extra_repr(self) -> str:
        exact = ", exact_neurons=True" if self.exact_neurons else ""
        exact += ", learned_chooser=True" if self.chooser_in is not None else ""
        return f"width={self.width}, input_keep={self.input_keep:.3f}, neuron_keep={self.neuron_keep:.3f}{exact}"


def _count(share: float, n: int) -> int:
    return max(1, min(n, math.floor(share * n + 0.5)))


def sparsify_(model: nn.Module, config: SparsityConfig) -> nn.Module:
    """Replaces every decoder layer's FFN but `config.dense_layers` by a `SparseFFN`, in place.

    Example:
        >>> model, tok = factorllm.load_model("smollm2-135m")
        >>> sparsify_(model, SparsityConfig.for_compute(0.5, input_keep=0.6))
    """
    ffns = find_ffns(model)  # fails fast on an unsupported, factorized or already sparse model
    if config.dense_layers and config.dense_layers[-1] >= len(ffns):
        raise ValueError(f"dense_layers={config.dense_layers}: the model has layers 0..{len(ffns) - 1}")
    for i, (name, mlp) in enumerate(ffns):
        if i not in config.dense_layers:
            model.set_submodule(name, SparseFFN.from_dense(mlp, config))
    model.sparsity_config = config
    return model


def densify_(model: nn.Module) -> nn.Module:
    """Undoes `sparsify_` in place: every SparseFFN becomes its dense module again, holding the SparseFFN's
    weights (fine-tuned or not). The result is a plain transformers model (`save_pretrained` writes a checkpoint
    that stock tools load); it runs every channel and neuron."""
    for name, block in sparse_layers(model):
        model.set_submodule(name, block.to_dense())
    if hasattr(model, "sparsity_config"):
        del model.sparsity_config
    return model


@contextlib.contextmanager
def dense_prefill(model: nn.Module):
    """Within it, a sparsified model's FFNs run dense on inference calls of more than one position a sequence
    (a prompt's prefill) and sparse on one position (decoding, the native kernel's calls).

    Why: per-token subsets of weights do not batch into matrix products, so a sparse prefill costs more than
    the dense one (`benchmarks/sparse_speed.py`); dense prefill costs what the dense model's does and computes
    the prompt exactly, while decoding, the memory-bound part, keeps the sparse speed-up. Training (grad
    enabled) is untouched. Perplexity measured inside it is the dense FFNs' on the whole window: measure
    quality outside.

    Example:
        >>> with dense_prefill(model):
        ...     out = model.generate(ids, max_new_tokens=64)
    """
    blocks = [block for _, block in sparse_layers(model)]
    if not blocks:
        raise ValueError("dense_prefill needs a sparsified model: this one has no SparseFFN (factorllm.sparsify_ "
                         "or factorllm.load of a saved sparse model)")
    before = [block.dense_prefill for block in blocks]
    for block in blocks:
        block.dense_prefill = True
    try:
        yield model
    finally:
        for block, was in zip(blocks, before, strict=True):
            block.dense_prefill = was


@torch.no_grad()
def choose_input_keep(model: nn.Module, windows: torch.Tensor, fraction: float, dense_layers: tuple[int, ...] = (),
                      exact_neurons: bool = False, grid: tuple[float, ...] = INPUT_KEEP_GRID,
                      batch_size: int = 2) -> tuple[SparsityConfig, dict[float, float]]:
    """The config that runs `fraction` of a dense model's FFN compute with the input share from `grid` whose
    sparse model is closest to the dense one on `windows` [B, S] (token ids): the mean distillation loss, KL of
    the dense model's next-token distribution to the sparse one's, averaged over batches of `batch_size` windows.
    Returns it and the loss of every share that leaves a neuron share in (0, 1]. The model is not changed; a
    sparse copy of it is held while this runs (twice the model's memory), and the dense logits of every batch.

    Why a search: at a given compute the split between input channels and neurons matters, and its best point
    differs between models, fractions and modes (SmolLM2 at 25% with exact neurons, training-free, held-out
    Python docs: input shares 0.075 / 0.15 / 0.25 gave perplexity 381 / 178 / 324;
    benchmarks/results/oneoff_activation_sparsity_variants2.json).

    Example:
        >>> cfg, losses = choose_input_keep(model, calib_ids[:2], 0.5)   # then sparsify_(model, cfg)
    """
    ffns = find_ffns(model)
    num_layers, gated = len(ffns), ffns_gated(ffns)
    configs, reasons = {}, set()
    for keep in grid:
        try:
            configs[keep] = SparsityConfig.for_compute(fraction, keep, gated, dense_layers, num_layers, exact_neurons)
        except ValueError as err:  # this input share leaves no valid neuron share at this fraction
            reasons.add(str(err))
    if not configs:
        why = reasons.pop() if len(reasons) == 1 else "raise the fraction, or give the input share yourself"
        raise ValueError(f"at {fraction:.0%} of the FFN compute no input share on the grid {grid} gives a valid "
                         f"config: {why}")
    batches = windows.split(batch_size)  # [<=batch_size, S] each
    was_training = model.training
    teacher = [model.eval()(input_ids=b, use_cache=False).logits for b in batches]  # [b, S, V] each
    model.train(was_training)
    # one sparse copy whose shares change in place: each block reads its shares at every call
    student = sparsify_(copy.deepcopy(model), next(iter(configs.values()))).eval()
    scores = {}
    for keep, cfg in configs.items():
        for _, block in sparse_layers(student):
            block.input_keep, block.neuron_keep = cfg.input_keep, cfg.neuron_keep
        scores[keep] = sum(distill_loss(student(input_ids=b, use_cache=False).logits, t).item()
                           for b, t in zip(batches, teacher, strict=True)) / len(batches)
    return configs[min(scores, key=scores.get)], scores


def fit_chooser_(model: nn.Module, windows: torch.Tensor, steps: int = 100, lr: float = 3e-3,
                 batch_tokens: int = 1024, batch_size: int = 4, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Gives every SparseFFN of an exact-neuron sparse model a learned chooser and fits it, layer by layer, in
    place: copies of the input projections that the input-sparse pass reads, trained so that the values they give
    from each token's kept channels are close to the exact neuron values (`losses.chooser_loss`), on the inputs
    each block sees when the model runs `windows` [B, S] (token ids). Only the choice of neurons changes: the
    chosen ones are still computed exactly by the FFN's own weights, and the cost per token is the same. It holds
    every block's inputs at once (layers x B x S x D floats: 1.1 GB for SmolLM2 at 16k tokens) and twice each
    block's input projections.

    Why: the input-sparse pass drops most channels, and the neurons it ranks first are often not the ones the
    whole input makes largest; fitted weights make up for part of what the dropped channels carry, from the
    channels they keep (a trained model's hidden channels are correlated). SmolLM2 at 25%, exact neurons
    0.15 / 0.124, layer 0 dense, the defaults on 16k training tokens (4.4 minutes on 2 cores): the exact top
    neurons found 0.43-0.69 -> 0.52-0.75 a layer, training-free perplexity 139 -> 72 on the Python docs and
    254 -> 149 on KJV (4 held-out windows; 2026-12-02).

    Returns, per block, the recall of the exact top neurons (the share of each token's `neuron_keep` neurons with
    the largest |h_i| * ||w_out_i|| that the chooser keeps) on the last eighth of the tokens, which no step trains
    on, before and after fitting. Refits from the FFN's weights if a chooser is already there.

    Example:
        >>> sparsify_(model, SparsityConfig.for_compute(0.25, 0.15, exact_neurons=True))
        >>> fit_chooser_(model, calib_ids)   # then fine-tune the FFN weights end to end, as without it
    """
    blocks = sparse_layers(model)
    if not blocks:
        raise ValueError("fit_chooser_ needs a sparsified model (factorllm.sparsify_ with exact_neurons=True)")
    if not all(b.exact_neurons for _, b in blocks):
        raise ValueError("fit_chooser_ needs exact_neurons=True (SparsityConfig): without it the input-sparse values "
                         "are the FFN's output, not only a choice")
    if steps < 1 or lr <= 0 or batch_tokens < 1:
        raise ValueError(f"steps={steps}, lr={lr} and batch_tokens={batch_tokens} must be positive")
    if windows.dim() != 2 or windows.numel() < 2:
        raise ValueError(f"fit_chooser_ needs token ids [B, S] of at least 2 tokens, got shape {tuple(windows.shape)}")
    inputs, _ = collect(model, [b for _, b in blocks], windows, batch_size)  # per block [T, D]
    gen = torch.Generator().manual_seed(seed)
    recalls = {}
    for name, block in blocks:
        x = inputs.pop(0)  # [T, D]; freed once this block is fitted
        held = max(1, x.shape[0] // 8)  # >= 1 token left to fit on: windows hold at least 2
        block.add_chooser()
        recalls[name] = _fit_block_chooser(block, x[:-held], x[-held:], steps, lr, batch_tokens, gen)
    return recalls


def mean_recall(recalls: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """(before, after) of `fit_chooser_`'s per-block recalls, averaged over the blocks."""
    return tuple(sum(r[i] for r in recalls.values()) / len(recalls) for i in (0, 1))


def _fit_block_chooser(block: SparseFFN, x: torch.Tensor, x_held: torch.Tensor, steps: int, lr: float,
                       batch_tokens: int, gen: torch.Generator) -> tuple[float, float]:
    """Fits one block's chooser on inputs x [T, D]; returns its recall of the exact top neurons on x_held
    before and after."""
    keep_in, keep_h = block.kept_counts()
    with torch.no_grad():
        weight = block.neuron_norms()  # [F]
        target, target_held = block.weights().intermediate(x), block.weights().intermediate(x_held)  # [T, F]

    @torch.no_grad()
    def recall() -> float:
        exact = top_mask(target_held.abs() * weight, keep_h)  # [T, F]
        chosen = top_mask(block.chooser().intermediate(block.sparse_input(x_held, keep_in)).abs() * weight, keep_h)
        return ((exact * chosen).sum() / exact.sum()).item()

    before = recall()
    params = [p for p in (block.chooser_in, block.chooser_up) if p is not None]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch_tokens, x.shape[0]),), generator=gen)
        loss = block.chooser_error(x[idx], target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    return before, recall()


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseFFN]]:
    """`(qualified name, block)` of every SparseFFN in a sparsified model, in layer order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseFFN)]
