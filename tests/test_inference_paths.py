"""The inference variants (no autograd: in-place, out=) of every path equal the naive reference."""

from __future__ import annotations

import pytest
import torch
from test_experts import ROUTINGS, _ffn, _partition

from factorllm import experts as experts_module
from factorllm import native
from factorllm.experts import EXPERT_PATHS, Experts


@pytest.mark.parametrize("path", [p for p in EXPERT_PATHS.names() if p != "naive"])
@pytest.mark.parametrize("gated,bias", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("sizes", [[8] * 6, [2, 4, 6, 8, 4, 8, 10, 6]], ids=["equal", "unequal"])
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("tokens", [1, 3, 10])
@pytest.mark.parametrize("packing", ["packed", "packed-threaded", "unpacked"])
def test_inference_path_equals_naive(path, gated, bias, sizes, routing, tokens, packing, monkeypatch):
    if path in ("padded", "grouped_mm") and len(set(sizes)) > 1:
        pytest.skip("padded and grouped_mm run equal experts only")
    if packing != "unpacked":  # tiny experts are below the packing threshold: lower it so the packed and native
        monkeypatch.setattr(experts_module, "PACK_MIN_BYTES", 0)  # many-token paths run here too
    if packing == "packed-threaded":  # the native schedule for large experts: one at a time, all threads
        monkeypatch.setattr(native, "PARALLEL_EXPERTS_BELOW", 0)
    experts = Experts.from_ffn(_ffn(gated, bias), _partition(sizes))
    indices = ROUTINGS[routing](tokens, len(sizes))
    weights = torch.rand(indices.shape, generator=torch.Generator().manual_seed(4))
    x = torch.randn(tokens, 12, generator=torch.Generator().manual_seed(5))
    experts.path = path
    with torch.no_grad():
        torch.testing.assert_close(experts(x, weights, indices), experts.forward_naive(x, weights, indices),
                                   atol=1e-5, rtol=1e-5)


def test_view_cache_survives_training_and_deepcopy():
    import copy

    experts = Experts.from_ffn(_ffn(True, False), _partition([8] * 6))
    x, idx = torch.randn(1, 12), torch.tensor([[1, 4]])
    w = torch.ones(1, 2)
    with torch.no_grad():
        experts(x, w, idx)  # fills the cache
    opt = torch.optim.SGD(experts.parameters(), lr=0.1)
    experts.forward_naive(x, w, idx).sum().backward()
    opt.step()  # in-place update of the parameters behind the cached views
    clone = copy.deepcopy(experts)
    with torch.no_grad():
        for m in (experts, clone):
            torch.testing.assert_close(m(x, w, idx), m.forward_naive(x, w, idx), atol=1e-5, rtol=1e-5)
        clone.w_in.mul_(2)  # the copy owns its storage: the original is untouched
        assert not torch.allclose(clone(x, w, idx), experts(x, w, idx))
