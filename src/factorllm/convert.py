"""Model surgery: `convert_` swaps every decoder layer's dense FFN for a MoE block, in place."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from factorllm.adapters import FFNWeights, adapter_for, find_ffns
from factorllm.config import FactorConfig
from factorllm.moe import MoEFeedForward
from factorllm.partition import PARTITIONS, PartitionInput, equal_sizes


def convert_(
    model: nn.Module,
    config: FactorConfig,
    calib: Sequence[torch.Tensor] | None = None,
    *,
    progress: bool = True,
) -> nn.Module:
    """Replaces every decoder layer's FFN by a `MoEFeedForward`, in place, without changing a weight.

    The layers in `config.dense_layers` keep their dense FFN module as it is.

    With `top_k == num_experts` and `hard` gating the converted model computes the dense model's function.

    Args:
        model: a Hugging Face decoder LM of a supported family (it stays a `PreTrainedModel`).
        config: the factorization.
        calib: token-id tensors ([S] or [B, S]) run through the dense model to measure neuron activations;
            required by data-driven partitions (`coactivation`, `importance`) and by `shared_neurons > 0`.
        progress: show progress bars.

    Returns:
        The same model object, factorized; `model.factor_config` holds `config`.

    Example:
        >>> model, tok = factorllm.load_model("smollm2-135m")
        >>> factorllm.convert_(model, FactorConfig(8, 2, partition="coactivation"), calib=[ids[:2048]])
    """
    ffns = find_ffns(model)  # fails fast on an unsupported or already converted model
    if config.dense_layers and config.dense_layers[-1] >= len(ffns):
        raise ValueError(f"dense_layers={config.dense_layers}: the model has layers 0..{len(ffns) - 1}")
    if len(config.dense_layers) == len(ffns):
        raise ValueError(f"dense_layers={config.dense_layers} leaves no layer to factorize; keep some out of it")
    layers = [i for i in range(len(ffns)) if i not in config.dense_layers]  # the layers to factorize
    ffns = [ffns[i] for i in layers]
    strategy = PARTITIONS.get(config.partition)
    needs_calib = strategy.needs_calibration or config.shared_neurons > 0
    if needs_calib and not calib:
        why = f"partition {config.partition!r}" if strategy.needs_calibration else "shared_neurons > 0"
        raise ValueError(
            f"{why} needs calibration data: pass calib=[token ids, ...] (CLI: --calib-tokens N), "
            "or use a partition that needs none ('contiguous', 'random', 'kmeans')"
        )
    widths = [adapter_for(m).read(m).width for _, m in ffns]
    plans = [_expert_sizes(w, config) for w in widths]  # fails fast, before any data is run

    activations = collect_activations(model, ffns, calib, progress) if needs_calib else {}
    for layer, (name, mlp), sizes in tqdm(list(zip(layers, ffns, plans, strict=True)), desc="factorizing FFNs",
                                          disable=not progress):
        ffn = adapter_for(mlp).read(mlp)
        acts = activations.pop(name, None)
        neurons = torch.arange(ffn.width)
        shared = None
        if config.shared_neurons:
            usage = acts.abs().mean(dim=0)  # [F]
            shared = usage.topk(config.shared_neurons).indices.sort().values
            keep = torch.ones(ffn.width, dtype=torch.bool)
            keep[shared] = False
            neurons = neurons[keep]
        with torch.no_grad():
            part = strategy.fn(PartitionInput(ffn, neurons, sizes, config.seed + layer, acts))
        moe = MoEFeedForward.from_dense(mlp, config, part, shared, seed=config.seed + layer)
        model.set_submodule(name, moe)
    model.factor_config = config
    return model


def _expert_sizes(width: int, config: FactorConfig) -> list[int]:
    routed = width - config.shared_neurons
    if routed < config.num_experts:
        raise ValueError(
            f"FFN width {width} minus shared_neurons={config.shared_neurons} leaves {routed} neurons, "
            f"fewer than num_experts={config.num_experts}; lower shared_neurons or num_experts"
        )
    if config.expert_sizes is not None:
        if sum(config.expert_sizes) != routed:
            raise ValueError(
                f"expert_sizes sum to {sum(config.expert_sizes)}, but the FFN has {routed} routed neurons "
                f"(width {width} - shared_neurons {config.shared_neurons}); make them sum to {routed}"
            )
        return list(config.expert_sizes)
    return equal_sizes(routed, config.num_experts)


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    ffns: list[tuple[str, nn.Module]],
    calib: Sequence[torch.Tensor],
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Each FFN's neuron activations h(x) [T, F] on the calibration tokens, from the layer's real input.

    NOTE: the inputs are captured with forward pre-hooks during one pass of the dense model, so layer l sees
    exactly what it sees at inference (not the previous layer's FFN output, as the reference code did).
    """
    readers: dict[str, FFNWeights] = {name: adapter_for(m).read(m) for name, m in ffns}
    acts: dict[str, list[torch.Tensor]] = {name: [] for name, _ in ffns}

    def hook(name: str):
        def fn(_module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])  # [T, D]
            acts[name].append(readers[name].intermediate(x).float().cpu())

        return fn

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in ffns]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for ids in tqdm(list(calib), desc="calibration", disable=not progress):
            ids = ids if ids.dim() == 2 else ids[None]  # [B, S]
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: torch.cat(chunks) for name, chunks in acts.items()}
