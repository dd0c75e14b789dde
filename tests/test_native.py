"""The native CPU kernels (csrc/moe_kernels.c) against the torch path, and when they are (not) taken."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, tiny_model, token_batch

from factorllm import FactorConfig, convert_, native
from factorllm.moe import moe_layers

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the torch path runs instead")


def _blocks(family: str, cfg: FactorConfig):
    model = convert_(tiny_model(family), cfg, progress=False)
    return model, [b for _, b in moe_layers(model)]


def _torch_path(block, x):
    """What the block computes without the kernel: router, then the stacked experts' naive reference."""
    _, weights, indices = block.route(x)
    y = block.experts.forward_naive(x, weights, indices)
    if block.shared is not None:
        y = y + block.shared.expert(0, x)
    return y + (block.b_out if block.b_out is not None else 0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gating", sorted(native.GATINGS))
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_kernel_equals_torch_path(family, gating, top_k):
    _, blocks = _blocks(family, FactorConfig(4, top_k, gating=gating, router="linear"))
    x = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for block in blocks:
            block.router.net.bias.normal_(0, 0.5)  # a trained router's bias: the kernel must add it
            y = block(x[None])[0]
            assert block._kernel is not None, f"{family}: the kernel should apply"
            torch.testing.assert_close(y, _torch_path(block, x), atol=1e-5, rtol=1e-5)


def test_greedy_generation_is_unchanged_by_the_kernel(monkeypatch):
    model = convert_(tiny_model("llama"), FactorConfig(4, 2), progress=False)
    prompt = token_batch(1, 8)
    with torch.no_grad():
        fast = model.generate(prompt, max_new_tokens=12, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)
        assert all(b._kernel is not None for _, b in moe_layers(model))
        monkeypatch.setattr(native, "available", lambda: False)
        for _, b in moe_layers(model):
            b._kernel = None
        slow = model.generate(prompt, max_new_tokens=12, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)
        assert all(b._kernel is None for _, b in moe_layers(model))
    assert torch.equal(fast.sequences, slow.sequences)
    for a, b in zip(fast.logits, slow.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["grad", "oracle", "mlp router", "router hook", "unequal experts", "two tokens"])
def test_kernel_is_not_taken_where_it_does_not_apply(case):
    cfg = {"oracle": FactorConfig(4, 2, gating="oracle"), "mlp router": FactorConfig(4, 2, router="mlp"),
           "unequal experts": FactorConfig(4, 2, expert_sizes=[16, 16, 8, 24])}.get(case, FactorConfig(4, 2))
    model, blocks = _blocks("llama", cfg)
    block = blocks[0]
    seen = []
    if case == "router hook":
        block.router.register_forward_hook(lambda m, a, o: seen.append(o))
    x = torch.randn(1, 2 if case == "two tokens" else 1, 32)
    with torch.set_grad_enabled(case == "grad"):
        y = block(x)
    if case in ("oracle", "mlp router", "unequal experts"):
        assert block._kernel is None
    elif case == "router hook":
        assert len(seen) == 1  # routing traces see the token
    elif case == "grad":
        assert y.requires_grad  # the kernel's output would carry no graph
    with torch.no_grad():
        torch.testing.assert_close(y.view(-1, 32), _torch_path(block, x.view(-1, 32)), atol=1e-5, rtol=1e-5)


def test_kernel_follows_new_weights():
    model, blocks = _blocks("llama", FactorConfig(4, 2))
    block, x = blocks[0], torch.randn(1, 1, 32)
    with torch.no_grad():
        block(x)
        first = block._kernel
        clone = copy.deepcopy(block)  # its own storage: the kernel must be rebound, not shared
        assert clone._kernel is None
        clone.experts.w_in.mul_(2)
        torch.testing.assert_close(clone(x).view(1, 32), _torch_path(clone, x.view(1, 32)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(block(x).view(1, 32), _torch_path(block, x.view(1, 32)), atol=1e-5, rtol=1e-5)
        assert block._kernel is first
        block.experts.w_in = torch.nn.Parameter(block.experts.w_in * 3)  # new storage
        torch.testing.assert_close(block(x).view(1, 32), _torch_path(block, x.view(1, 32)), atol=1e-5, rtol=1e-5)
        assert block._kernel is not first


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_both_decode_schedules_equal_the_torch_path(threads, top_k):
    """k a multiple of the threads: whole experts per thread; otherwise expert after expert, MKL-threaded."""
    _, blocks = _blocks("llama", FactorConfig(8, top_k, gating="softmax_renorm"))
    x = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.no_grad():
            for block in blocks:
                y = block(x)
                assert block._kernel is not None
                torch.testing.assert_close(y.view(1, 32), _torch_path(block, x.view(1, 32)), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("change", ["hook", "data", "grad", "strided", "float64"])
def test_a_bound_kernel_steps_aside(change):
    """What `forward` checks on every call once bound: changes after the first call reach the torch path."""
    model, blocks = _blocks("llama", FactorConfig(4, 2))
    block, x = blocks[0], torch.randn(1, 1, 32)
    with torch.no_grad():
        block(x)
    first, seen = block._kernel, []
    assert first is not None
    if change == "hook":
        block.router.register_forward_hook(lambda m, a, o: seen.append(o))
    elif change == "data":
        block.experts.w_in.data = block.experts.w_in.data * 2  # same Parameter, new storage
    elif change == "strided":
        x = torch.randn(1, 1, 64)[..., ::2]  # one token, not contiguous
    elif change == "float64":
        model.double()
        x = x.double()
    with torch.set_grad_enabled(change == "grad"):
        y = block(x)
    assert len(seen) == (change == "hook")  # routing traces see the token
    with torch.no_grad():
        torch.testing.assert_close(y.view(1, 32), _torch_path(block, x.reshape(1, 32)), atol=1e-5, rtol=1e-5)
    if change == "grad":
        assert y.requires_grad
    elif change == "data":
        assert block._kernel is not first  # rebound to the new storage


def test_activation_codes_match_torch():
    from torch import nn
    from transformers.activations import ACT2FN

    assert native.act_code(nn.SiLU()) == 0
    assert native.act_code(nn.GELU(approximate="tanh")) == 1
    assert native.act_code(nn.GELU()) == 2
    assert native.act_code(nn.ReLU()) == 3
    for name in ("gelu_new", "gelu_pytorch_tanh", "gelu", "silu", "relu"):
        assert native.act_code(ACT2FN[name]) is not None, name
    assert native.act_code(nn.Tanh()) is None  # no kernel for it: the torch path runs


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_activation_right_outside_the_float_range(act):
    """csrc exp_f clamps its argument to [-87, 89] (exp(89) = inf): the activations stay right far out."""
    from torch import nn

    module = nn.SiLU() if act == "silu" else nn.GELU(approximate="tanh")
    probe = torch.cat([torch.linspace(-300, 300, 601), torch.tensor([-1e4, -90.0, -87.5, 88.5, 90.0, 1e4])])
    got = torch.tensor([native._lib().factorllm_act(float(v), native._ACT_CODES[act]) for v in probe])
    torch.testing.assert_close(got, module(probe), atol=1e-6, rtol=1e-6)


def test_kernel_follows_set_routing():
    from factorllm import set_routing_

    model, blocks = _blocks("llama", FactorConfig(4, 2))
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        blocks[0](x)
        for top_k, gating in ((1, None), (3, "sum"), (3, "oracle")):
            set_routing_(model, top_k=top_k, gating=gating)
            block = moe_layers(model)[0][1]
            torch.testing.assert_close(block(x).view(1, 32), _torch_path(block, x.view(1, 32)), atol=1e-5, rtol=1e-5)
            assert (block._kernel is None) == (gating == "oracle")
        block.router.top_k = 2  # edited in place, not swapped
        torch.testing.assert_close(block(x).view(1, 32), _torch_path(block, x.view(1, 32)), atol=1e-5, rtol=1e-5)


def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTORLLM_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="FACTORLLM_NATIVE=0"):
        assert native._lib.__wrapped__() is None
    monkeypatch.setenv("FACTORLLM_NATIVE", "0")
    assert native._lib.__wrapped__() is None


def _prefill_case(tokens: int, seed: int):
    from test_experts import _ffn, _partition

    from factorllm.experts import Experts

    experts = Experts.from_ffn(_ffn(True, True), _partition([8] * 6))
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(tokens)])  # [T, 2]
    return experts, torch.randn(tokens, 12, generator=g), torch.rand(tokens, 2, generator=g), indices


@pytest.mark.skipif(not native.mkl.available(), reason="the many-token kernel needs MKL's packed GEMM")
def test_prefill_scratch_is_reused_across_sizes_and_dropped_above_the_cap(monkeypatch):
    from factorllm import experts as experts_module

    monkeypatch.setattr(experts_module, "PACK_MIN_BYTES", 0)
    monkeypatch.setattr(native, "_thread_scratch", native.threading.local())  # this test's own scratch
    with torch.no_grad():
        for tokens, seed in [(40, 0), (7, 1), (40, 2), (90, 3)]:  # grow, a smaller call on stale rows, grow again
            experts, x, w, idx = _prefill_case(tokens, seed)
            torch.testing.assert_close(native.prefill(experts, x, w, idx), experts.forward_naive(x, w, idx),
                                       atol=1e-5, rtol=1e-5)
            if tokens == 40:
                kept = native._thread_scratch.value.floats
        after = native._thread_scratch.value.floats
        assert after.numel() >= 90 * 2 * (12 + 16 + 1) and after.data_ptr() != kept.data_ptr()  # grew for 90
        experts, x, w, idx = _prefill_case(40, 4)
        native.prefill(experts, x, w, idx)
        assert native._thread_scratch.value.floats.data_ptr() == after.data_ptr()  # reused, not reallocated
        monkeypatch.setattr(native, "SCRATCH_KEEP_BYTES", 1024)
        native.prefill(experts, x, w, idx)
        assert native._thread_scratch.value.floats.numel() == 0  # over the cap: given back after the call


@pytest.mark.skipif(not native.mkl.available(), reason="the many-token kernel needs MKL's packed GEMM")
def test_prefill_from_two_threads_at_once(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from factorllm import experts as experts_module

    monkeypatch.setattr(experts_module, "PACK_MIN_BYTES", 0)
    cases = [_prefill_case(64, seed) for seed in range(8)]
    with torch.no_grad():
        want = [e.forward_naive(x, w, i) for e, x, w, i in cases]

        def run(case):
            with torch.no_grad():
                return [native.prefill(*case) for _ in range(20)]

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(run, cases))
    for outs, ref in zip(got, want, strict=True):
        for y in outs:
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not native.mkl.available(), reason="the many-token kernel needs MKL's packed GEMM")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("gating", sorted(native.GATINGS))
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("router", ["linear", "linear_nobias"])
def test_routed_prefill_kernel_equals_torch_path(family, gating, top_k, router, monkeypatch):
    from factorllm import experts as experts_module

    monkeypatch.setattr(experts_module, "PACK_MIN_BYTES", 0)  # tiny experts: let the many-token kernel run
    calls = []
    real = native.prefill_routed
    monkeypatch.setattr(native, "prefill_routed", lambda *a: calls.append(1) or real(*a))
    _, blocks = _blocks(family, FactorConfig(4, top_k, gating=gating, router=router))
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0))  # [B, S, D]: 18 tokens
    with torch.no_grad():
        for block in blocks:
            if block.router.net.bias is not None:
                block.router.net.bias.normal_(0, 0.5)  # a trained router's bias: the kernel must add it
            calls.clear()
            y = block(x)
            assert calls, "the block should have taken the routed many-token kernel"
            torch.testing.assert_close(y, _torch_path(block, x.view(-1, 32)).view_as(y), atol=1e-5, rtol=1e-5)
            out, weights, indices = native.prefill_routed(block.router, block.experts, x.view(-1, 32))
            torch.testing.assert_close(out.view_as(y), y)
            _, want_w, want_i = block.route(x.view(-1, 32))
            assert torch.equal(indices, want_i)
            torch.testing.assert_close(weights, want_w.to(weights.dtype))


@pytest.mark.skipif(not native.mkl.available(), reason="the many-token kernel needs MKL's packed GEMM")
@pytest.mark.parametrize("case", ["router hook", "experts hook", "grad", "forced path", "mlp router", "float64",
                                  "activation the kernels lack"])
def test_routed_prefill_kernel_steps_aside(case, monkeypatch):
    from factorllm import experts as experts_module

    monkeypatch.setattr(experts_module, "PACK_MIN_BYTES", 0)
    monkeypatch.setattr(native, "prefill_routed", lambda *a: pytest.fail(f"{case}: the kernel must not run"))
    _, blocks = _blocks("llama", FactorConfig(4, 2, router="mlp" if case == "mlp router" else "linear"))
    block = blocks[0]
    x = torch.randn(1, 12, 32)
    seen = []
    if case == "router hook":
        block.router.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    if case == "experts hook":
        block.experts.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    if case == "forced path":
        block.experts.path = "naive"
    if case == "float64":
        block.double()
        x = x.double()
    if case == "activation the kernels lack":
        block.experts.act = torch.nn.Tanh()
        assert not native.prefill_available(block.experts)
    with torch.set_grad_enabled(case == "grad"):
        y = block(x)
    assert y.shape == x.shape
    if "hook" in case:
        assert seen == [12]  # the hook saw every token
