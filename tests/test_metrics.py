"""Routing statistics on hand-made routings whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model, token_batch

from factorllm import FactorConfig, convert_
from factorllm.metrics import (
    chunk_sparsity,
    expert_load,
    oracle_agreement,
    output_norm_ratio,
    router_entropy,
    routing_stats,
    token_sparsity,
)


def test_load_entropy_and_sparsity_on_known_routings():
    idx = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]])
    assert expert_load(idx, 4).tolist() == [0.5, 0.25, 0.125, 0.125]
    assert router_entropy(torch.zeros(3, 4)) == pytest.approx(math.log(4))
    assert token_sparsity(idx, 4) == pytest.approx(0.5)
    same = torch.tensor([[0, 1]] * 8)
    assert chunk_sparsity(same, 8, chunk=8) == pytest.approx(6 / 8)  # one chunk uses 2 of 8 experts
    spread = torch.arange(16).remainder(8).view(8, 2)
    assert chunk_sparsity(spread, 8, chunk=8) == 0.0  # the chunk touches every expert
    with pytest.raises(ValueError, match="at least 8 tokens"):
        chunk_sparsity(same[:3], 8)


def test_oracle_agreement_and_norm_ratio():
    outs = torch.zeros(2, 4, 3)
    outs[:, 2] = 5.0
    outs[:, 0] = 1.0
    assert oracle_agreement(torch.tensor([[2, 0], [2, 1]]), outs) == pytest.approx(0.75)
    ratio = output_norm_ratio(torch.ones(2, 2), torch.tensor([[2, 0], [2, 0]]), outs)
    assert ratio == pytest.approx(1.0)
    assert output_norm_ratio(torch.ones(2, 1), torch.tensor([[0], [0]]), outs) == pytest.approx(1 / 6)


def test_routing_stats_per_layer_on_a_tiny_model():
    model = convert_(tiny_model("llama"), FactorConfig(4, 2, gating="sum"), progress=False)
    rows = routing_stats(model, token_batch(2, 16))
    assert [r["layer"] for r in rows] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for r in rows:
        assert sum(r["load"]) == pytest.approx(1.0) and r["token_sparsity"] == pytest.approx(0.5)
        assert 0 <= r["chunk_sparsity"] <= 0.5 and 0 <= r["oracle_agreement"] <= 1
        assert 0 < r["entropy"] <= r["max_entropy"] + 1e-6
