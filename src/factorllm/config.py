"""Typed, validated configuration of a factorization."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FactorConfig:
    """How every FFN is cut into experts and how tokens are routed to them.

    Args:
        num_experts: E, the number of routed experts per layer.
        top_k: k, the experts each token runs (1 <= k <= E).
        partition: how neurons are grouped into experts; a name from `factorllm.partition.PARTITIONS`
            (`contiguous`, `random`, `kmeans`, `coactivation`, `importance`).
        gating: how router logits become expert weights; a name from `factorllm.router.GATINGS`
            (`hard`, `sum`, `softmax_renorm`, `softmax`, `oracle`).
        router: the router network; a name from `factorllm.router.ROUTERS` (`linear`, `mlp`).
        shared_neurons: this many most-used neurons (measured on calibration data) form an always-on shared
            expert outside the routing; the rest is split into the E routed experts.
        seed: seed of random partitions, k-means initialisation and router initialisation.
        expert_sizes: optional unequal expert widths (one per expert, summing to the FFN width minus
            `shared_neurons`); equal widths by default.
        router_hidden: hidden width of the `mlp` router.
        dense_layers: decoder layers (0-based) whose FFN stays dense, as DeepSeek's first dense layers and
            Qwen2-MoE's `mlp_only_layers`: a layer whose router cannot predict its experts (SmolLM2's layer 0)
            costs more quality than its share of the compute.

    Example:
        >>> FactorConfig(num_experts=8, top_k=2, partition="coactivation")
    """

    num_experts: int
    top_k: int
    partition: str = "contiguous"
    gating: str = "hard"
    router: str = "linear"
    shared_neurons: int = 0
    seed: int = 0
    expert_sizes: tuple[int, ...] | None = None
    router_hidden: int = 128
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Imported here: the registries live beside the strategies they hold, and those modules import torch.
        from factorllm.partition import PARTITIONS
        from factorllm.router import GATINGS, ROUTERS

        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts!r} must be an integer >= 1")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k={self.top_k!r} must satisfy 1 <= top_k <= num_experts={self.num_experts}; "
                f"pick top_k between 1 and {self.num_experts}"
            )
        for value, registry in ((self.partition, PARTITIONS), (self.gating, GATINGS), (self.router, ROUTERS)):
            registry.get(value)  # raises ValueError naming the valid choices
        if self.shared_neurons < 0:
            raise ValueError(f"shared_neurons={self.shared_neurons} must be >= 0")
        if self.router_hidden < 1:
            raise ValueError(f"router_hidden={self.router_hidden} must be >= 1")
        if self.expert_sizes is not None:
            sizes = tuple(int(s) for s in self.expert_sizes)
            if len(sizes) != self.num_experts or min(sizes) < 1:
                raise ValueError(
                    f"expert_sizes={sizes} must hold num_experts={self.num_experts} positive widths"
                )
            object.__setattr__(self, "expert_sizes", sizes)
        dense = tuple(sorted({int(i) for i in self.dense_layers}))
        if any(i < 0 for i in dense):
            raise ValueError(f"dense_layers={self.dense_layers} must be layer indices >= 0")
        object.__setattr__(self, "dense_layers", dense)

    @property
    def ffn_compute_fraction(self) -> float:
        """Share of the dense FFN's neurons a token runs, for equal experts, no shared expert, no dense layer."""
        return self.top_k / self.num_experts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FactorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown FactorConfig fields {sorted(unknown)}; was it written by a newer factorllm?")
        data = dict(data)
        if data.get("expert_sizes") is not None:
            data["expert_sizes"] = tuple(data["expert_sizes"])
        data["dense_layers"] = tuple(data.get("dense_layers", ()))
        return cls(**data)
