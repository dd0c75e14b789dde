"""Losses and pseudo-labels, as pure functions of tensors.

Legend: T tokens, D hidden, E experts, k experts per token, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from factorllm.registry import Registry

# ---------------------------------------------------------------------------------------------------------------
# Pseudo-labels: which k experts should a token use? (expert outputs [T, E, D], teacher [T, D], k) -> mask [T, E]

PSEUDO_LABELS: Registry[Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = Registry("pseudo-label")


def _mask(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(indices.shape[0], num_experts, device=indices.device).scatter_(1, indices, 1.0)


@PSEUDO_LABELS.register("factorllm")
def factorllm_labels(outputs: torch.Tensor, teacher: torch.Tensor, k: int) -> torch.Tensor:
    """The reference code's label: the k experts closest (mean squared error over D) to the teacher output
    divided by E/k, each expert's "fair share" under hard gating's E/k rescale."""
    E = outputs.shape[1]
    d = (outputs - teacher[:, None] / (E / k)).square().mean(dim=-1)  # [T, E]
    return _mask(d.topk(k, dim=-1, largest=False).indices, E)


@PSEUDO_LABELS.register("norm")
def norm_labels(outputs: torch.Tensor, teacher: torch.Tensor, k: int) -> torch.Tensor:
    """The k experts with the largest output norm (the oracle gating's choice)."""
    return top_k_mask(outputs.norm(dim=-1), k)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask [T, E] of each token's k largest scores [T, E]."""
    return _mask(scores.topk(k, dim=-1).indices, scores.shape[1])


@PSEUDO_LABELS.register("lstsq")
def lstsq_labels(outputs: torch.Tensor, teacher: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy subset whose plain sum is closest to the teacher output: k rounds, each adding the expert that
    most reduces ||teacher - sum||^2."""
    T, E, _ = outputs.shape
    chosen = torch.zeros(T, E, dtype=torch.bool, device=outputs.device)
    residual = teacher.clone()  # [T, D]
    rows = torch.arange(T, device=outputs.device)
    for _ in range(k):
        err = (residual[:, None] - outputs).square().sum(dim=-1)  # [T, E]
        err = err.masked_fill(chosen, float("inf"))
        best = err.argmin(dim=-1)  # [T]
        chosen[rows, best] = True
        residual = residual - outputs[rows, best]
    return chosen.float()


# ---------------------------------------------------------------------------------------------------------------
# Router losses

def pa_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Prior-Approximate loss: mean over tokens of KL(p || q), p = softmax(router logits), q = softmax(labels).

    As in the reference code, q is the softmax of the 0/1 pseudo-label mask (for E=4, k=2: 0.366 on the chosen,
    0.134 on the others). Averaging over all tokens of all sequences makes a batch's loss the mean of its
    sequences' losses (the reference code silently kept the first sequence only).

    Args:
        logits: [T, E] (or [B, S, E]) router logits.
        labels: 0/1 mask of the same shape.
    """
    logp = logits.reshape(-1, logits.shape[-1]).float().log_softmax(dim=-1)  # [T, E]
    logq = labels.reshape(-1, labels.shape[-1]).float().log_softmax(dim=-1)  # [T, E]
    return (logp.exp() * (logp - logq)).sum(dim=-1).mean()


def switch_balance_loss(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Switch Transformer balance: E * sum_e f_e * P_e, f_e the share of routed slots that go to e (no
    gradient), P_e the mean router probability of e. Equals 1 when balanced."""
    logits = logits.reshape(-1, logits.shape[-1])
    E = logits.shape[-1]
    probs = logits.float().softmax(dim=-1)  # [T, E]
    f = torch.bincount(indices.reshape(-1), minlength=E).float() / indices.numel()  # [E]
    return E * (f * probs.mean(dim=0)).sum()


def reference_balance_loss(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The reference code's balance term: mean over tokens and experts of 1{e in top-k(p)} * p_e."""
    probs = logits.reshape(-1, logits.shape[-1]).float().softmax(dim=-1)  # [T, E]
    top = _mask(probs.topk(k, dim=-1).indices, probs.shape[-1])
    return (top * probs).mean()


def router_bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of each expert's logit against the 0/1 label (a per-expert alternative to PA)."""
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())


# ---------------------------------------------------------------------------------------------------------------
# Output losses

def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits [B, S, V], ids [B, S]."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logit distillation: mean over positions of KL(teacher || student) at `temperature` (scaled by t^2)."""
    t = temperature
    s, p = (z.reshape(-1, z.shape[-1]).float() for z in (student, teacher))  # [T, V]
    if t != 1:  # NOTE: each pass over [T, V] logits costs ~0.1 s at 1024 tokens of a 49k vocabulary
        s, p = s / t, p / t
    s, p = s.log_softmax(dim=-1), p.log_softmax(dim=-1)
    return (p.exp() * (p - s)).sum(dim=-1).mean() * t * t


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Relative squared error ||pred - target||^2 / ||target||^2 over the batch."""
    return (pred - target).float().square().sum() / target.float().square().sum().clamp_min(1e-12)


def chooser_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A neuron chooser's error: [T, F] predicted and exact neuron values, [F] weights (the output norms that
    score a neuron), mean over tokens of each token's relative squared error ||w * (pred - target)||^2 /
    ||w * target||^2 (per token, so that tokens with small activations count as much as large ones)."""
    err = ((pred - target) * weight).float().square().sum(-1)  # [T]
    return (err / (target * weight).float().square().sum(-1).clamp_min(1e-12)).mean()
