"""Stacked expert forward against the naive reference: outputs and gradients, edge-case routings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from factorllm.adapters import FFNWeights
from factorllm.experts import EXPERT_PATHS, Experts, choose_path
from factorllm.router import GATINGS

D, F = 12, 48


def _ffn(gated: bool, bias: bool) -> FFNWeights:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: 0.3 * torch.randn(*s, generator=g)  # noqa: E731  (O(1) activations)
    return FFNWeights(
        gated=gated, w_in=r(F, D), w_out=r(D, F), act=nn.SiLU() if gated else nn.GELU(),
        w_up=r(F, D) if gated else None, b_in=r(F) if bias else None, b_up=r(F) if (bias and gated) else None,
        b_out=None,
    )


def _partition(sizes):
    perm = torch.randperm(F, generator=torch.Generator().manual_seed(1))
    return list(torch.split(perm, sizes))


ROUTINGS = {
    "random top-2": lambda T, E: torch.rand(T, E, generator=torch.Generator().manual_seed(2)).topk(2).indices,
    "all to one expert": lambda T, E: torch.full((T, 1), 3),
    "top_k = E": lambda T, E: torch.arange(E).repeat(T, 1),
    # Expert E-1 is chosen by no token.
    "some experts idle": lambda T, E: torch.randint(0, E - 1, (T, 1), generator=torch.Generator().manual_seed(3)),
}


FAST_PATHS = [p for p in EXPERT_PATHS.names() if p != "naive"]


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("gated,bias", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("sizes", [[8] * 6, [2, 4, 6, 8, 4, 8, 10, 6]], ids=["equal", "unequal"])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_every_path_equals_naive(path, gated, bias, sizes, routing):
    if path in ("padded", "grouped_mm") and len(set(sizes)) > 1:
        pytest.skip("padded and grouped_mm run equal experts only (choose_path never picks them otherwise)")
    experts = Experts.from_ffn(_ffn(gated, bias), _partition(sizes))
    T, E = 10, len(sizes)
    indices = ROUTINGS[routing](T, E)
    weights = torch.rand(indices.shape, generator=torch.Generator().manual_seed(4))
    x1 = torch.randn(T, D, generator=torch.Generator().manual_seed(5), requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    w1, w2 = weights.clone().requires_grad_(True), weights.clone().requires_grad_(True)

    experts.path = path
    fast = experts(x1, w1, indices)
    grads_fast = torch.autograd.grad(fast.square().sum(), [x1, w1, *experts.parameters()])
    ref = experts.forward_naive(x2, w2, indices)
    grads_ref = torch.autograd.grad(ref.square().sum(), [x2, w2, *experts.parameters()])

    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    for gf, gr in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(gf, gr, atol=1e-5, rtol=1e-5)


def test_choose_path():
    experts = Experts.from_ffn(_ffn(True, False), _partition([6] * 8))
    balanced = torch.arange(64).remainder(8).view(32, 2)
    skewed = torch.zeros(32, 2, dtype=torch.long)
    skewed[:, 1] = torch.arange(32).remainder(7) + 1
    x = torch.randn(32, D)
    assert choose_path(experts, x[:1], balanced[:1]) == "decode"
    assert choose_path(experts, x, balanced) == "padded"
    assert choose_path(experts, x, skewed) == "sorted"
    with torch.no_grad():  # inference on MKL-packed weights: per-expert GEMMs beat the padded bmm
        assert choose_path(experts, x, balanced) == ("sorted" if experts.can_pack else "padded")
    unequal = Experts.from_ffn(_ffn(True, False), _partition([2, 4, 6, 8, 4, 8, 10, 6]))
    assert choose_path(unequal, x, balanced) == "sorted"
    # training: fine experts, or most experts chosen, run every expert masked (the dense FFN's cost)
    fine = Experts.from_ffn(_ffn(True, False), _partition([3] * 16))
    assert choose_path(fine, x, torch.arange(64).remainder(16).view(32, 2)) == "masked"
    assert choose_path(experts, x, torch.arange(8).repeat(32, 1)) == "masked"  # k = E
    with torch.no_grad():
        assert choose_path(fine, x, torch.arange(64).remainder(16).view(32, 2)) != "masked"


@pytest.mark.parametrize("gated", [True, False])
def test_all_outputs_sum_to_dense_and_match_each_expert(gated):
    ffn = _ffn(gated, bias=True)
    experts = Experts.from_ffn(ffn, _partition([2, 4, 6, 8, 4, 8, 10, 6]))
    x = torch.randn(7, D)
    with torch.no_grad():
        outs = experts.all_outputs(x)  # [T, E, D]
        torch.testing.assert_close(outs.sum(1), ffn(x), atol=1e-4, rtol=1e-5)
        for e in range(experts.num_experts):
            torch.testing.assert_close(outs[:, e], experts.expert(e, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("sizes", [[2, 4, 6, 8, 4, 8, 10, 6], [24, 24]])  # narrow (Gram) and I >= D (outputs)
def test_output_norms_equal_the_norms_of_all_outputs(gated, sizes):
    experts = Experts.from_ffn(_ffn(gated, bias=True), _partition(sizes))
    x = torch.randn(7, D)
    with torch.no_grad():
        torch.testing.assert_close(experts.output_norms(x), experts.all_outputs(x).norm(dim=-1), atol=1e-5,
                                   rtol=1e-4)


def test_gatings_shapes_and_weights():
    logits = torch.randn(5, 8)
    for name in GATINGS.names():
        w, i = GATINGS.get(name)(logits, 3)
        assert w.shape == i.shape == (5, 3), name
        assert torch.equal(i.sort(-1).values, logits.topk(3).indices.sort(-1).values), name
    w, _ = GATINGS.get("hard")(logits, 2)
    assert torch.all(w == 4.0)  # E/k
    w, _ = GATINGS.get("softmax_renorm")(logits, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    w, _ = GATINGS.get("softmax")(logits, 3)
    assert torch.all(w.sum(-1) < 1)
    w, _ = GATINGS.get("oracle")(logits, 3)
    assert torch.all(w == 1.0)
    w, _ = GATINGS.get("sum")(logits, 3)
    assert torch.all(w == 1.0)
