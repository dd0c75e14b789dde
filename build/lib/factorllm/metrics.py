"""Routing statistics, as pure functions of router outputs and expert outputs.

Legend: T tokens (in sequence order), E experts, k experts per token, D hidden.
"""

from __future__ import annotations

import torch


def expert_load(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Share of routed slots each expert receives: indices [T, k] -> [E], summing to 1 (uniform = 1/E)."""
    return torch.bincount(indices.reshape(-1), minlength=num_experts).float() / indices.numel()


def router_entropy(logits: torch.Tensor) -> float:
    """Mean entropy (nats) of the router's softmax over experts; log(E) is uniform. logits [T, E]."""
    logp = logits.float().log_softmax(dim=-1)
    return float(-(logp.exp() * logp).sum(dim=-1).mean())


def oracle_agreement(indices: torch.Tensor, expert_outputs: torch.Tensor) -> float:
    """Share of the oracle's k experts (largest output norms) the router also chose. [T, k], [T, E, D]."""
    k = indices.shape[1]
    oracle = expert_outputs.norm(dim=-1).topk(k, dim=-1).indices  # [T, k]
    hits = (indices[:, :, None] == oracle[:, None, :]).any(dim=-1)  # [T, k]
    return float(hits.float().mean())


def token_sparsity(indices: torch.Tensor, num_experts: int) -> float:
    """Share of experts a token leaves idle: 1 - k/E (counting distinct chosen experts)."""
    distinct = torch.zeros(indices.shape[0], num_experts).scatter_(1, indices, 1.0).sum(dim=-1)
    return float(1 - distinct.mean() / num_experts)


def chunk_sparsity(indices: torch.Tensor, num_experts: int, chunk: int = 8) -> float:
    """BlockFFN's chunk-level sparsity: share of experts that no token of a chunk of `chunk` consecutive
    tokens uses (what a kernel that loads each expert once per chunk saves). Trailing tokens are dropped."""
    T = indices.shape[0] // chunk * chunk
    if T == 0:
        raise ValueError(f"need at least {chunk} tokens for chunk sparsity, got {indices.shape[0]}")
    used = torch.zeros(T, num_experts).scatter_(1, indices[:T], 1.0)  # [T, E]
    per_chunk = used.view(-1, chunk, num_experts).amax(dim=1)  # [T/chunk, E]
    return float(1 - per_chunk.mean())


def output_norm_ratio(weights: torch.Tensor, indices: torch.Tensor, expert_outputs: torch.Tensor) -> float:
    """Mean over tokens of ||sum of chosen weighted experts|| / ||sum of all experts|| (the dense FFN's routed
    part). 1 means the routed output is as large as the dense one. [T, k], [T, k], [T, E, D]."""
    chosen = expert_outputs.gather(1, indices[..., None].expand(-1, -1, expert_outputs.shape[-1]))  # [T, k, D]
    routed = (chosen * weights[..., None]).sum(dim=1).norm(dim=-1)  # [T]
    full = expert_outputs.sum(dim=1).norm(dim=-1).clamp_min(1e-12)  # [T]
    return float((routed / full).mean())


@torch.no_grad()
def routing_stats(model, ids: torch.Tensor, chunk: int = 8) -> list[dict]:
    """Per MoE layer, on token ids [B, S]: load, entropy, oracle agreement, token and chunk sparsity, output
    norm ratio. Each layer is measured on its real input in this forward pass."""
    from factorllm.train import trace_routing

    with trace_routing(model) as traces:
        model(input_ids=ids, use_cache=False)
    from factorllm.moe import moe_layers

    rows = []
    for (name, block), tr in zip(moe_layers(model), traces, strict=True):
        r = tr.routing
        E = block.num_experts
        outs = block.experts.all_outputs(tr.inputs)  # [T, E, D]
        # NOTE: chunks must not straddle sequences: indices are in [B*S] order, S a multiple of chunk here.
        rows.append({
            "layer": name, "load": expert_load(r.indices, E).tolist(), "entropy": router_entropy(r.logits),
            "max_entropy": float(torch.log(torch.tensor(float(E)))),
            "oracle_agreement": oracle_agreement(r.indices, outs),
            "token_sparsity": token_sparsity(r.indices, E), "chunk_sparsity": chunk_sparsity(r.indices, E, chunk),
            "output_norm_ratio": output_norm_ratio(r.weights, r.indices, outs),
        })
    return rows
