"""Routers (token -> expert scores) and gatings (scores -> the k experts a token runs, with their weights).

Legend: T tokens, D hidden, E experts, k experts per token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from factorllm.registry import Registry


class RouterOutput(NamedTuple):
    logits: torch.Tensor  # [T, E]  raw scores (for the oracle: each expert's output norm)
    weights: torch.Tensor  # [T, k]  the multiplier of each chosen expert's output
    indices: torch.Tensor  # [T, k]  the chosen experts, int64


# ---------------------------------------------------------------------------------------------------------------
# Router networks: [T, D] -> logits [T, E]

ROUTERS: Registry[Callable[..., nn.Module]] = Registry("router")


@ROUTERS.register("linear")
def linear_router(hidden: int, num_experts: int, router_hidden: int = 0) -> nn.Module:
    """FactorLLM's router: one linear layer with bias on the FFN's (normalised) input.

    NOTE: the bias starts at zero, so an untrained router favours no expert (and exports to formats whose
    routers have no bias until training moves it).
    """
    net = nn.Linear(hidden, num_experts, bias=True)
    nn.init.zeros_(net.bias)
    return net


@ROUTERS.register("linear_nobias")
def linear_nobias_router(hidden: int, num_experts: int, router_hidden: int = 0) -> nn.Module:
    """Mixtral's and Qwen2-MoE's router: one linear layer without bias (exportable after any training)."""
    return nn.Linear(hidden, num_experts, bias=False)


@ROUTERS.register("mlp")
def mlp_router(hidden: int, num_experts: int, router_hidden: int = 128) -> nn.Module:
    """MoEfication's router: Linear-Tanh-Linear."""
    return nn.Sequential(nn.Linear(hidden, router_hidden), nn.Tanh(), nn.Linear(router_hidden, num_experts))


# ---------------------------------------------------------------------------------------------------------------
# Gatings: logits [T, E], k -> weights [T, k], indices [T, k]

GATINGS: Registry[Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]] = Registry("gating")


@GATINGS.register("hard")
def hard_gating(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FactorLLM: the top-k experts, each weighted E/k (so k of E experts are scaled up to the full FFN).

    NOTE: the weights are constants, so no gradient reaches the router through them.
    """
    num_experts = logits.shape[-1]
    indices = logits.topk(k, dim=-1).indices  # [T, k]
    return logits.new_full(indices.shape, num_experts / k), indices


@GATINGS.register("sum")
def sum_gating(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k experts added as they are, each at weight 1: the oracle's weighting with a learned router.

    NOTE: factorized experts are exact parts of the dense FFN, so the chosen ones need no rescale; `hard`'s
    E/k assumes every expert carries an equal share, which the measured partitions are far from.
    """
    indices = logits.topk(k, dim=-1).indices  # [T, k]
    return logits.new_ones(indices.shape), indices


@GATINGS.register("softmax_renorm")
def softmax_renorm_gating(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral: softmax over the k chosen logits (the weights sum to 1)."""
    top, indices = logits.topk(k, dim=-1)  # [T, k], [T, k]
    return top.softmax(dim=-1), indices


@GATINGS.register("softmax")
def softmax_gating(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-MoE with norm_topk_prob=False: softmax over all E, keep the k largest probabilities."""
    probs = logits.softmax(dim=-1)  # [T, E]
    weights, indices = probs.topk(k, dim=-1)  # [T, k], [T, k]
    return weights, indices


@GATINGS.register("oracle")
def oracle_gating(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Analysis only: `logits` are each expert's output norm; keep the k largest, each at weight 1.

    NOTE: weight 1 and no E/k rescale, because the experts are exact parts of the dense FFN: the sum of the
    chosen ones is the dense output minus the parts left out.
    """
    indices = logits.topk(k, dim=-1).indices  # [T, k]
    return logits.new_ones(indices.shape), indices


class Router(nn.Module):
    """Scores tokens with a registered router network and picks k experts with a registered gating.

    `forward(x, scores=None)`: pass `scores` to route on precomputed logits instead of the network's (the
    oracle gating routes on expert output norms).
    """

    def __init__(self, net: nn.Module, gating: str, top_k: int, straight_through: bool = False) -> None:
        super().__init__()
        self.net = net
        self.gating = gating
        self.top_k = top_k
        self._gate = GATINGS.get(gating)
        # Hard gating's constant weights pass no gradient to the router; with straight_through the forward
        # value stays E/k while the backward pass sees the chosen experts' softmax probabilities.
        self.straight_through = straight_through

    def forward(self, x: torch.Tensor, scores: torch.Tensor | None = None) -> RouterOutput:
        if scores is not None:
            logits = scores
        elif type(self.net) is nn.Linear:
            # NOTE: a direct call saves a module call, a fifth of a batch-1 MoE block's time on CPU.
            logits = nn.functional.linear(x, self.net.weight, self.net.bias)  # [T, E]
        else:
            logits = self.net(x)  # [T, E]
        weights, indices = self._gate(logits, self.top_k)  # [T, k], [T, k]
        if self.straight_through and self.gating in ("hard", "sum") and torch.is_grad_enabled():
            p = logits.softmax(dim=-1).gather(1, indices)  # [T, k]
            weights = weights + (p - p.detach())
        return RouterOutput(logits, weights, indices)

    def extra_repr(self) -> str:
        return f"gating={self.gating!r}, top_k={self.top_k}, straight_through={self.straight_through}"
