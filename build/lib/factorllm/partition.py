"""Partitions: which of an FFN's neurons go together into one expert.

A partition is a list of E int64 index tensors over the FFN's neurons, disjoint. Each strategy is a function
`(PartitionInput) -> list[Tensor]` registered by name; it may use the FFN's weights and, when it says
`needs_calibration`, the neurons' activations on calibration tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from factorllm.adapters import FFNWeights
from factorllm.registry import Registry


@dataclass
class PartitionInput:
    ffn: FFNWeights
    neurons: torch.Tensor  # [N]  the neurons to split (all F, or those outside the shared expert)
    sizes: list[int]  # E expert widths, summing to N
    seed: int
    activations: torch.Tensor | None = None  # [T, F]  neuron activations on calibration tokens


@dataclass(frozen=True)
class PartitionStrategy:
    fn: Callable[[PartitionInput], list[torch.Tensor]]
    needs_calibration: bool


PARTITIONS: Registry[PartitionStrategy] = Registry("partition")


def register_partition(name: str, needs_calibration: bool = False):
    def decorator(fn: Callable[[PartitionInput], list[torch.Tensor]]):
        PARTITIONS.register(name)(PartitionStrategy(fn, needs_calibration))
        return fn

    return decorator


def split_by_sizes(ordered: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Cuts an ordering of neurons into consecutive groups of the given sizes."""
    return [g.clone() for g in torch.split(ordered, sizes)]


def equal_sizes(width: int, num_experts: int) -> list[int]:
    """E equal expert widths, or a ValueError that names the widths that would work."""
    if width % num_experts:
        divisors = [d for d in range(2, min(width, 512) + 1) if width % d == 0]
        raise ValueError(
            f"cannot split {width} neurons into {num_experts} equal experts ({width} % {num_experts} != 0); "
            f"use num_experts in {divisors[:16]}, or give unequal expert_sizes summing to {width}"
        )
    return [width // num_experts] * num_experts


@register_partition("contiguous")
def contiguous(inp: PartitionInput) -> list[torch.Tensor]:
    """The reference code's split: consecutive slices of the neurons in their stored order."""
    return split_by_sizes(inp.neurons, inp.sizes)


@register_partition("random")
def random(inp: PartitionInput) -> list[torch.Tensor]:
    """The paper's text: a seeded random permutation, then consecutive slices."""
    g = torch.Generator().manual_seed(inp.seed)
    return split_by_sizes(inp.neurons[torch.randperm(len(inp.neurons), generator=g)], inp.sizes)


@register_partition("importance", needs_calibration=True)
def importance(inp: PartitionInput) -> list[torch.Tensor]:
    """Neurons sorted by mean |activation| on calibration tokens: expert 0 holds the most used ones."""
    usage = inp.activations[:, inp.neurons].abs().mean(dim=0)  # [N]
    return split_by_sizes(inp.neurons[usage.argsort(descending=True, stable=True)], inp.sizes)


@register_partition("kmeans")
def kmeans(inp: PartitionInput) -> list[torch.Tensor]:
    """MoEfication's parameter split: balanced k-means on the neurons' (normalised) input weight rows."""
    ffn = inp.ffn
    rows = ffn.w_in[inp.neurons]  # [N, D]
    feats = _unit(rows.float())
    if ffn.gated:
        feats = torch.cat([feats, _unit(ffn.w_up[inp.neurons].float())], dim=1)  # [N, 2D]
    labels = balanced_kmeans(feats, inp.sizes, inp.seed)
    return [inp.neurons[labels == e] for e in range(len(inp.sizes))]


@register_partition("coactivation", needs_calibration=True)
def coactivation(inp: PartitionInput) -> list[torch.Tensor]:
    """Balanced clustering of neurons by their activation profiles on calibration tokens.

    NOTE: a neuron's profile is its |activation| over the calibration tokens, centred and normalised, so two
    neurons are close when they are large on the same tokens; that is what lets a few experts carry a token.
    """
    prof = inp.activations[:, inp.neurons].abs().float().t()  # [N, T]
    feats = _unit(prof - prof.mean(dim=1, keepdim=True))
    labels = balanced_kmeans(feats, inp.sizes, inp.seed)
    return [inp.neurons[labels == e] for e in range(len(inp.sizes))]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def balanced_kmeans(feats: torch.Tensor, sizes: list[int], seed: int, iters: int = 25) -> torch.Tensor:
    """Spherical k-means whose cluster e holds exactly sizes[e] points.

    Args:
        feats: [N, M] unit-norm features.
        sizes: cluster sizes, summing to N.
    Returns:
        labels: [N] int64 in [0, E).
    """
    N, E = feats.shape[0], len(sizes)
    assert sum(sizes) == N, (sizes, N)
    g = torch.Generator().manual_seed(seed)
    centroids = feats[torch.randperm(N, generator=g)[:E]]  # [E, M]
    labels = None
    for _ in range(iters):
        sim = feats @ centroids.t()  # [N, E]
        new = balanced_assign(sim, sizes)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        onehot = torch.zeros(N, E).scatter_(1, labels[:, None], 1.0)  # [N, E]
        centroids = _unit(onehot.t() @ feats)  # [E, M]
    return labels


def balanced_assign(sim: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Greedy capacity-constrained assignment: take (point, cluster) pairs from the most similar down,
    skipping points already placed and clusters already full. sim: [N, E] -> labels [N]."""
    N, E = sim.shape
    order = np.argsort(-sim.detach().cpu().numpy(), axis=None, kind="stable")  # over the N*E pairs
    labels = np.full(N, -1, dtype=np.int64)
    room = np.asarray(sizes, dtype=np.int64).copy()
    placed = 0
    for flat in order:
        i, e = divmod(int(flat), E)
        if labels[i] < 0 and room[e] > 0:
            labels[i] = e
            room[e] -= 1
            placed += 1
            if placed == N:
                break
    return torch.from_numpy(labels)
