"""GEMMs on MKL-packed weights (prefill and layer-wise inference) against nn.functional.linear."""

from __future__ import annotations

import pytest
import torch
from test_experts import _ffn, _partition

from factorllm import experts as experts_module
from factorllm import mkl
from factorllm.experts import Experts

pytestmark = pytest.mark.skipif(not mkl.available(), reason="this torch build has no MKL packed GEMM")


@pytest.fixture
def pack_tiny(monkeypatch):
    """The tests' experts are far below the packing threshold; lower it so they are packed."""
    monkeypatch.setattr(experts_module, "PACK_MIN_BYTES", 0)


@pytest.mark.parametrize("rows", [0, 1, 5, 37, 130, 600])
def test_linear_equals_functional_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(48, 20, generator=g)
    x = torch.randn(rows, 20, generator=g)
    p = mkl.pack(w)
    torch.testing.assert_close(mkl.linear(x, p), torch.nn.functional.linear(x, w), atol=1e-5, rtol=1e-5)
    out = torch.randn(rows, 48, generator=g)
    want = out + torch.nn.functional.linear(x, w)
    mkl.linear(x, p, out=out, accumulate=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_row_views_of_a_larger_tensor():
    big = torch.randn(10, 48, 20)
    w, x = big[3], torch.randn(40, 20)[5:17]  # views with storage offsets
    out = torch.zeros(30, 48)[10:22]
    mkl.linear(x, mkl.pack(w), out=out)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w), atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_refused():
    p = mkl.pack(torch.randn(8, 4))
    with pytest.raises(ValueError, match="contiguous rows"):
        mkl.linear(torch.randn(4, 3).t(), p)  # [3, 4] with column stride 3... wrong K as well
    with pytest.raises(ValueError, match="float32"):
        mkl.linear(torch.randn(2, 4, dtype=torch.float64), p)
    with pytest.raises(ValueError, match="out must be"):
        mkl.linear(torch.randn(2, 4), p, out=torch.empty(2, 7))
    with pytest.raises(ValueError, match="float32 CPU weight"):
        mkl.pack(torch.randn(4, 8).t())


def test_packed_experts_follow_optimizer_steps_and_clear_cache(pack_tiny):
    experts = Experts.from_ffn(_ffn(True, True), _partition([8] * 6))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=g)  # each expert gets more than DECODE_MAX_TOKENS rows: packed weights used
    idx = torch.arange(80).remainder(6).view(40, 2)
    w = torch.rand(40, 2, generator=g)
    with torch.no_grad():
        experts(x, w, idx)
    assert experts._packed is not None
    opt = torch.optim.SGD(experts.parameters(), lr=0.1)
    experts.forward_naive(x, w, idx).square().sum().backward()
    opt.step()  # in place: same storage, new version
    with torch.no_grad():
        torch.testing.assert_close(experts(x, w, idx), experts.forward_naive(x, w, idx), atol=1e-5, rtol=1e-5)
        experts.w_out.data.mul_(1.5)  # bypasses the version counter: clear_cache is the documented remedy
        experts.clear_cache()
        torch.testing.assert_close(experts(x, w, idx), experts.forward_naive(x, w, idx), atol=1e-5, rtol=1e-5)


def test_experts_copy_and_save_after_packed_inference(tmp_path, pack_tiny):
    import copy

    experts = Experts.from_ffn(_ffn(True, False), _partition([8] * 6))
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(1))
    idx, w = torch.arange(80).remainder(6).view(40, 2), torch.ones(40, 2)
    with torch.no_grad():
        want = experts(x, w, idx)  # fills the packed and pointer caches (ctypes: not picklable)
        clone = copy.deepcopy(experts)
        torch.save(experts, tmp_path / "e.pt")
        torch.testing.assert_close(clone(x, w, idx), want)
        clone.w_in.mul_(2)  # its own storage and packs: the original is untouched
        torch.testing.assert_close(experts(x, w, idx), want)


def test_small_experts_are_not_packed():
    small = Experts.from_ffn(_ffn(True, False), _partition([8] * 6))  # 12 x 8: far below PACK_MIN_BYTES
    assert not small.can_pack
    x, idx, w = torch.randn(40, 12), torch.arange(80).remainder(6).view(40, 2), torch.ones(40, 2)
    with torch.no_grad():
        small(x, w, idx)
    assert small._packed is None


def test_packed_buffers_leave_untouched_memory_out():
    import gc

    def rss_mb():
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1e3

    w = torch.randn(80, 576)  # MKL reserves ~9 MB for this 0.18 MB weight
    assert mkl.packed_bytes(80, 576) > 20 * w.numel() * 4
    gc.collect()
    before = rss_mb()
    packs = [mkl.pack(w) for _ in range(100)]
    grown = rss_mb() - before
    assert grown < 0.3 * 100 * mkl.packed_bytes(80, 576) / 1e6, grown  # far below what was reserved
    del packs
    gc.collect()
    assert rss_mb() - before < 0.5 * grown + 5  # and given back when freed
