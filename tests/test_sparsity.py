"""Activation sparsity: SparseFFN against a per-token reference, its compute accounting, surgery and training."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import FAMILIES, tiny_model, token_batch
from torch import nn

from factorllm import FactorConfig, convert_, native
from factorllm.adapters import FFNWeights, adapter_for, find_ffns
from factorllm.losses import distill_loss
from factorllm.sparsity import (
    KERNEL_MAX_TOKENS,
    SparseFFN,
    SparsityConfig,
    choose_input_keep,
    dense_prefill,
    fit_chooser_,
    sparse_layers,
    sparsify_,
    top_mask,
)
from factorllm.tracing import trace_inputs
from factorllm.train import TrainConfig, TrainData, train


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_everything_computes_the_dense_model(family):
    dense = tiny_model(family)
    ids = token_batch()
    sparse = sparsify_(copy.deepcopy(dense), SparsityConfig(1.0, 1.0))
    assert len(sparse_layers(sparse)) == 2
    with torch.no_grad():
        torch.testing.assert_close(sparse(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def naive_sparse_ffn(block: SparseFFN, x: torch.Tensor) -> torch.Tensor:
    """Reference: token by token, the kept channels and neurons as index lists, only their weights multiplied.
    The input-sparse pass reads the learned chooser's projections where the block has one (channels are still
    scored by the FFN's own columns)."""
    w = block.weights()
    col = w.w_in.norm(dim=0) if w.w_up is None else torch.cat([w.w_in, w.w_up]).norm(dim=0)  # [D]
    if block.chooser_in is not None:
        w = FFNWeights(w.gated, block.chooser_in, w.w_out, w.act, block.chooser_up, w.b_in, w.b_up, w.b_out)
    n_in = max(1, round(block.input_keep * x.shape[1]))
    n_h = max(1, round(block.neuron_keep * block.width))
    out = []
    for xt in x:  # [D]
        c = (xt.abs() * col).topk(n_in).indices  # kept channels
        pre = w.w_in[:, c] @ xt[c] + (0 if w.b_in is None else w.b_in)  # [F]
        h = w.act(pre)
        if w.gated:
            h = h * (w.w_up[:, c] @ xt[c] + (0 if w.b_up is None else w.b_up))
        n = (h.abs() * w.w_out.norm(dim=0)).topk(n_h).indices  # kept neurons
        if block.exact_neurons:  # chosen from the input-sparse values, computed on the whole input
            h = block.weights().intermediate(xt[None])[0]
        out.append(w.w_out[:, n] @ h[n] + (0 if w.b_out is None else w.b_out))
    return torch.stack(out)


@pytest.mark.parametrize("family", ["llama", "llama-bias", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("keep", [(0.5, 0.25), (0.75, 0.5), (0.2, 1.0)])
@pytest.mark.parametrize("tokens", [KERNEL_MAX_TOKENS + 8, 1, 3])  # the masked products; then the native kernel
@pytest.mark.parametrize("exact", [False, True])
def test_sparse_ffn_matches_the_per_token_reference(family, keep, tokens, exact):
    mlp = find_ffns(tiny_model(family))[0][1]
    block = SparseFFN.from_dense(mlp, SparsityConfig(*keep, exact_neurons=exact))
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = block(x[None])[0]
        want = naive_sparse_ffn(block, x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        full = adapter_for(mlp).read(mlp)(x)
    if exact and keep[1] == 1.0:  # every neuron, computed exactly: the dense FFN, whatever the input share
        torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    else:
        assert (got - full).abs().max() > 1e-3  # the masks do change the output
    ran_kernel = block._kernel is not None
    assert ran_kernel == (native.available() and tokens <= KERNEL_MAX_TOKENS)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("tokens", [KERNEL_MAX_TOKENS + 8, 1, 3])  # the masked products; then the native kernel
def test_a_learned_chooser_changes_which_neurons_run_not_their_values(family, tokens):
    mlp = find_ffns(tiny_model(family))[0][1]
    block = SparseFFN.from_dense(mlp, SparsityConfig(0.25, 0.25, exact_neurons=True))
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = block(x)
        block.add_chooser()  # copies of the FFN's own projections: the same choice
        torch.testing.assert_close(block(x), before, atol=1e-6, rtol=1e-6)
        for p in (block.chooser_in, block.chooser_up):
            if p is not None:
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
        got = block(x)
        torch.testing.assert_close(got, naive_sparse_ffn(block, x), atol=1e-5, rtol=1e-5)
    assert (got - before).abs().max() > 1e-3  # another choice of neurons
    assert (block._kernel is not None) == (native.available() and tokens <= KERNEL_MAX_TOKENS)
    assert "learned_chooser=True" in repr(block)
    with pytest.raises(ValueError, match="needs exact_neurons=True"):
        SparseFFN.from_dense(mlp, SparsityConfig(0.25, 0.25)).add_chooser()


def _correlated_llama():
    """A tiny Llama whose embeddings have rank 2: correlated channels, as a trained model's residual stream has (a
    random model's channels are independent: nothing to predict the dropped ones from)."""
    dense = tiny_model("llama")
    with torch.no_grad():
        emb, gen = dense.model.embed_tokens.weight, torch.Generator().manual_seed(0)  # [V, D]
        emb.copy_(torch.randn(emb.shape[0], 2, generator=gen) @ torch.randn(2, emb.shape[1], generator=gen) / 2**.5)
    return dense


def test_fit_chooser_finds_more_of_the_exact_neurons_and_leaves_the_ffn_alone():
    dense = _correlated_llama()
    model = sparsify_(copy.deepcopy(dense), SparsityConfig(0.25, 0.25, exact_neurons=True))
    ffn_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    recalls = fit_chooser_(model, token_batch(16, 32))
    assert list(recalls) == [n for n, _ in sparse_layers(model)]
    for before, after in recalls.values():  # measured on tokens no step trains on
        assert after > before + 0.08
    assert all(torch.equal(p, ffn_weights[n]) for n, p in model.named_parameters() if n in ffn_weights)
    assert all(not b.chooser_in.requires_grad for _, b in sparse_layers(model))
    # the end-to-end loop trains the FFN weights and leaves the fitted chooser as it is
    chooser = {n: p.detach().clone() for n, p in model.named_parameters() if "chooser" in n}
    cfg = TrainConfig(mode="end2end", train_router=False, train_experts=True, distill_weight=1.0, lr=1e-2,
                      max_steps=2, batch_size=4, save_every=0)
    train(model, dense, TrainData(token_batch(8, 16)), cfg, progress=False)
    assert all(torch.equal(p, chooser[n]) for n, p in model.named_parameters() if "chooser" in n)
    assert not torch.equal(model.model.layers[0].mlp.w_up, ffn_weights["model.layers.0.mlp.w_up"])


def _chooser_errors(model, ids):
    """Each learned chooser's loss on its block's input when the model runs ids [B, S]."""
    blocks = [b for _, b in sparse_layers(model)]
    with torch.no_grad(), trace_inputs(blocks) as inputs:
        model(input_ids=ids)
    with torch.no_grad():
        return [b.chooser_error(x).item() for b, x in zip(blocks, inputs, strict=True)]


@pytest.mark.parametrize("mode,extra", [
    ("end2end", dict(distill_weight=1.0, batch_size=4, max_steps=20)),
    ("layerwise", dict(recon_weight=1.0, token_batch=128, layerwise_tokens=256, max_steps=40)),
])
def test_training_the_chooser_along_fits_it_to_the_changing_ffn(mode, extra):
    dense = _correlated_llama()
    start = sparsify_(copy.deepcopy(dense), SparsityConfig(0.25, 0.25, exact_neurons=True))
    for _, block in sparse_layers(start):
        block.add_chooser()  # unfitted: copies of the FFN's own projections
    ids, held = token_batch(16, 16), token_batch(4, 16, seed=1)
    runs = {}
    for weight in (0.0, 1.0):
        model = copy.deepcopy(start)
        cfg = TrainConfig(mode=mode, train_router=False, train_experts=True, lr=1e-2, chooser_weight=weight,
                          chooser_lr=3e-2, save_every=0, **extra)
        train(model, dense, TrainData(ids), cfg, progress=False)
        runs[weight] = model
    frozen, along = runs[0.0], runs[1.0]
    unfitted = dict(start.named_parameters())
    assert all(torch.equal(p, unfitted[n]) for n, p in frozen.named_parameters() if "chooser" in n)
    for a, b in zip(_chooser_errors(along, held), _chooser_errors(frozen, held), strict=True):
        assert a < 0.8 * b  # on windows no step saw
    # the FFN weights still train (the chooser loss reaches only the chooser: it only chooses)
    assert not torch.equal(along.model.layers[1].mlp.w_up, start.model.layers[1].mlp.w_up)


class _Interrupt(Exception):
    pass


def test_a_run_training_the_chooser_along_resumes_where_it_stopped(tmp_path):
    dense = _correlated_llama()
    start = sparsify_(copy.deepcopy(dense), SparsityConfig(0.25, 0.25, exact_neurons=True))
    fit_chooser_(start, token_batch(4, 16), steps=2)
    data = TrainData(token_batch(8, 16))
    cfg = TrainConfig(mode="end2end", train_router=False, train_experts=True, distill_weight=1.0, lr=1e-2,
                      chooser_weight=1.0, chooser_lr=3e-2, chooser_tokens=16, max_steps=5, batch_size=2,
                      save_every=2)
    whole = copy.deepcopy(start)
    train(whole, dense, data, dataclasses.replace(cfg, output_dir=str(tmp_path / "a")), progress=False)

    def stop_at_3(step, _row):
        if step == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(copy.deepcopy(start), dense, data, dataclasses.replace(cfg, output_dir=str(tmp_path / "b")),
              callbacks=[stop_at_3], progress=False)
    resumed = copy.deepcopy(start)  # a new process starts from the fitted model again
    train(resumed, dense, data, dataclasses.replace(cfg, output_dir=str(tmp_path / "b"), resume=True), progress=False)
    want = dict(whole.named_parameters())
    for name, p in resumed.named_parameters():
        torch.testing.assert_close(p, want[name], atol=1e-6, rtol=1e-6, msg=name)
    assert not torch.equal(want["model.layers.1.mlp.chooser_in"], start.model.layers[1].mlp.chooser_in)


def test_training_the_chooser_needs_one_and_a_positive_rate():
    dense = tiny_model("llama")
    model = sparsify_(copy.deepcopy(dense), SparsityConfig(0.5, 0.5, exact_neurons=True))
    cfg = TrainConfig(mode="end2end", train_router=False, train_experts=True, distill_weight=1.0, chooser_weight=1.0,
                      max_steps=1, save_every=0)
    with pytest.raises(ValueError, match="fit them first with factorllm.fit_chooser_"):
        train(model, dense, TrainData(token_batch(2, 16)), cfg, progress=False)
    with pytest.raises(ValueError, match="has no learned chooser"):
        sparse_layers(model)[0][1].chooser_error(torch.randn(3, 32))
    with pytest.raises(ValueError, match="learning rates must be > 0"):
        TrainConfig(chooser_lr=0.0)
    with pytest.raises(ValueError, match="chooser_tokens=0 must be >= 1"):
        TrainConfig(chooser_tokens=0)


def test_fit_chooser_needs_an_exact_neuron_sparse_model():
    with pytest.raises(ValueError, match="needs a sparsified model"):
        fit_chooser_(tiny_model("llama"), token_batch(2, 16))
    with pytest.raises(ValueError, match="needs exact_neurons=True"):
        fit_chooser_(sparsify_(tiny_model("llama"), SparsityConfig(0.5, 0.5)), token_batch(2, 16))
    exact = sparsify_(tiny_model("llama"), SparsityConfig(0.5, 0.5, exact_neurons=True))
    with pytest.raises(ValueError, match=r"needs token ids \[B, S\] of at least 2 tokens, got shape \(0, 16\)"):
        fit_chooser_(exact, token_batch(2, 16)[:0])
    with pytest.raises(ValueError, match="must be positive"):
        fit_chooser_(exact, token_batch(2, 16), steps=0)
    assert all(b.chooser_in is None for _, b in sparse_layers(exact))  # nothing changed before the error


needs_kernel = pytest.mark.skipif(not native.available(), reason="no C compiler: the masked path runs instead")


@needs_kernel
def test_kernel_breaks_ties_by_index_and_keeps_exact_counts():
    """Every channel scores the same (columns of equal norms, x all ones): the kernel keeps the first ones."""
    signs = torch.randint(0, 2, (2, 40, 16), generator=torch.Generator().manual_seed(0)) * 2 - 1
    w = FFNWeights(True, 0.1 * signs[0].float(), torch.randn(16, 40) / 6, nn.SiLU(), 0.1 * signs[1].float())
    block = SparseFFN(w, input_keep=0.25, neuron_keep=0.5)  # 4 of 16 channels, 20 of 40 neurons
    x = torch.ones(1, 16)
    with torch.no_grad():
        got = block(x)
        h = w.intermediate(x * (torch.arange(16) < 4))[0]  # [F]: channels 0-3 only
        n = (h.abs() * w.w_out.norm(dim=0)).topk(20).indices
        want = w.w_out[:, n] @ h[n]
    assert block._kernel is not None
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_kernel_follows_weight_updates_and_steps_aside_for_training():
    block = SparseFFN.from_dense(find_ffns(tiny_model("llama"))[0][1], SparsityConfig(0.5, 0.5))
    x = torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        block(x)
        kernels = [block._kernel]
        for change in (lambda: block.w_up.mul_(2.0),  # in place, as an optimizer step: same address, new version
                       lambda: setattr(block.w_out, "data", block.w_out.data * 0.5)):  # a new tensor
            change()
            torch.testing.assert_close(block(x), naive_sparse_ffn(block, x), atol=1e-5, rtol=1e-5)
            assert block._kernel is not kernels[-1]
            kernels.append(block._kernel)
        twin = copy.deepcopy(block)  # a copy rebuilds its own kernel on its own weights
        assert twin._kernel is None
        twin.w_in.mul_(0.5)
        torch.testing.assert_close(twin(x), naive_sparse_ffn(twin, x), atol=1e-5, rtol=1e-5)
        assert twin._kernel is not None and twin._kernel is not block._kernel
    y = block(x)  # grad enabled: the masked products, which pass gradient
    y.sum().backward()
    assert y.requires_grad and block.w_in.grad.abs().sum() > 0


@needs_kernel
def test_greedy_generation_is_unchanged_by_the_kernel(monkeypatch):
    model = sparsify_(tiny_model("llama"), SparsityConfig(0.5, 0.4))
    ids = token_batch()[:1, :6]
    with torch.no_grad():
        fast = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert all(b._kernel is not None for _, b in sparse_layers(model))
        monkeypatch.setattr(native, "available", lambda: False)
        for _, b in sparse_layers(model):
            b._kernel = None
        slow = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert all(b._kernel is None for _, b in sparse_layers(model))
    assert fast.tolist() == slow.tolist()


def test_dense_prefill_computes_the_prompt_dense_and_decodes_sparse():
    dense = tiny_model("llama").eval()
    model = sparsify_(copy.deepcopy(dense), SparsityConfig(0.5, 0.4)).eval()
    ids = token_batch()[:2, :6]
    with torch.no_grad():
        sparse_logits = model(input_ids=ids).logits
        with dense_prefill(model):
            torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits)
            out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
        assert not torch.allclose(sparse_logits, dense(input_ids=ids).logits, atol=1e-3)
        torch.testing.assert_close(model(input_ids=ids).logits, sparse_logits)  # restored on exit
        # reference: the dense model's cache of the prompt, then the sparse model one position at a time
        step = dense(input_ids=ids, use_cache=True)
        cache, logits = step.cache, [step.logits[:, -1]]  # [B, V] a step
        dense_cache = copy.deepcopy(cache)
        for _ in range(2):
            token = logits[-1].argmax(-1, keepdim=True)  # [B, 1]
            step = model(input_ids=token, cache=cache, use_cache=True)
            cache = step.cache
            logits.append(step.logits[:, -1])
        dense_step = dense(input_ids=logits[0].argmax(-1, keepdim=True), cache=dense_cache).logits[:, -1]
    for got, want in zip(out.logits, logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[1], dense_step, atol=1e-3)  # decoding was sparse
    assert not any(block.dense_prefill for _, block in sparse_layers(model))
    with dense_prefill(model):  # training is untouched: the masked products, with gradient
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits.detach(), sparse_logits)
    with pytest.raises(ValueError, match="sparsify_"):
        with dense_prefill(dense):
            pass


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("exact", [False, True])
def test_choose_input_keep_scores_each_valid_share_and_keeps_the_closest(family, exact):
    dense = tiny_model(family).eval()
    gated = family == "llama"
    ids = token_batch()[:3, :12]
    grid = (0.1, 0.3, 0.5, 0.7, 0.9)
    cfg, scores = choose_input_keep(dense, ids, 0.75, dense_layers=(1,), exact_neurons=exact, grid=grid)
    assert not sparse_layers(dense)  # the model is not changed
    # the shares that leave a neuron share in (0, 1] at 50% of layer 0: gated [0.25, 0.75), exact (0, 0.75);
    # plain (input and neurons half the FFN each) (0, 1) either way
    assert set(scores) == (({0.1, 0.3, 0.5, 0.7} if exact else {0.3, 0.5, 0.7}) if gated else set(grid))
    assert cfg.input_keep == min(scores, key=scores.get) and cfg.exact_neurons == exact and cfg.dense_layers == (1,)
    assert cfg.mean_compute(2, gated) == pytest.approx(0.75)  # layer 1 dense, layer 0 at 50%
    for keep in {min(scores), cfg.input_keep}:  # each score is that share's own sparse model against the dense one
        want = SparsityConfig.for_compute(0.75, keep, gated, dense_layers=(1,), num_layers=2, exact_neurons=exact)
        student = sparsify_(copy.deepcopy(dense), want)
        with torch.no_grad():
            loss = torch.stack([distill_loss(student(input_ids=b).logits, dense(input_ids=b).logits)
                                for b in ids.split(2)]).mean()
        assert scores[keep] == pytest.approx(loss.item(), rel=1e-5)
    assert len(set(scores.values())) == len(scores)
    with pytest.raises(ValueError, match="no input share on the grid .* raise the fraction"):
        choose_input_keep(dense, ids, 0.05)
    with pytest.raises(ValueError, match="dense layers alone run 50%"):
        choose_input_keep(dense, ids, 0.4, dense_layers=(0,))


def test_top_mask_keeps_exactly_the_largest_even_with_ties():
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 2.0, 0.5]])
    mask = top_mask(scores, 2)
    assert mask.sum(dim=1).tolist() == [2.0, 2.0]
    assert mask[1].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_compute_accounting_and_for_compute():
    cfg = SparsityConfig(0.6, 0.3)
    assert cfg.ffn_compute(gated=True) == pytest.approx(0.5)
    assert cfg.ffn_compute(gated=False) == pytest.approx(0.45)
    assert SparsityConfig.for_compute(0.5, 0.6).neuron_keep == pytest.approx(0.3)
    assert SparsityConfig.for_compute(0.5, 0.6, gated=False).neuron_keep == pytest.approx(0.4)
    # layer 0 dense: the other 9 layers make up the rest of 50% over 10 layers
    cfg = SparsityConfig.for_compute(0.5, 0.5, dense_layers=(0,), num_layers=10)
    assert (1 + 9 * cfg.ffn_compute()) / 10 == pytest.approx(0.5) == cfg.mean_compute(10)
    # exact neurons: the input share only chooses; each kept neuron costs a whole row of every matrix
    exact = SparsityConfig(0.15, 0.15, exact_neurons=True)
    assert exact.ffn_compute(gated=True) == pytest.approx(0.25)
    assert exact.ffn_compute(gated=False) == pytest.approx(0.225)
    assert SparsityConfig.for_compute(0.25, 0.15, exact_neurons=True).neuron_keep == pytest.approx(0.15)
    with pytest.raises(ValueError, match=r"choose input_keep in \[0.000, 0.375\)"):
        SparsityConfig.for_compute(0.25, 0.5, exact_neurons=True)
    with pytest.raises(ValueError, match=r"choose input_keep in \[0.250, 0.750\)"):
        SparsityConfig.for_compute(0.5, 0.8)
    with pytest.raises(ValueError, match="dense layers alone run 50% of the FFN compute"):
        SparsityConfig.for_compute(0.5, 0.5, dense_layers=(0,), num_layers=2)
    with pytest.raises(ValueError, match="needs num_layers"):
        SparsityConfig.for_compute(0.5, 0.6, dense_layers=(0,))


@pytest.mark.parametrize("kw,msg", [
    (dict(input_keep=0.0, neuron_keep=0.5), "input_keep=0.0 must be in"),
    (dict(input_keep=0.5, neuron_keep=1.5), "neuron_keep=1.5 must be in"),
    (dict(input_keep=0.5, neuron_keep=0.5, dense_layers=(-1,)), "layer indices"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SparsityConfig(**kw)


def test_surgery_refuses_converted_sparse_and_out_of_range():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="the model has layers 0..1"):
        sparsify_(copy.deepcopy(model), SparsityConfig(0.5, 0.5, dense_layers=(2,)))
    sparse = sparsify_(copy.deepcopy(model), SparsityConfig(0.5, 0.5, dense_layers=(0,)))
    assert [n for n, _ in sparse_layers(sparse)] == ["model.layers.1.mlp"]
    with pytest.raises(ValueError, match="already sparsified"):
        sparsify_(sparse, SparsityConfig(0.5, 0.5))
    with pytest.raises(ValueError, match="already sparsified"):
        convert_(sparse, FactorConfig(4, 2), progress=False)
    with pytest.raises(ValueError, match="already factorized"):
        sparsify_(convert_(copy.deepcopy(model), FactorConfig(4, 2), progress=False), SparsityConfig(0.5, 0.5))


def test_end_to_end_distillation_trains_only_the_sparse_ffns_and_lowers_the_loss():
    dense = tiny_model("llama")
    student = sparsify_(copy.deepcopy(dense), SparsityConfig(0.5, 0.25, dense_layers=(0,)))
    ids = token_batch(8, 16)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}

    def gap():
        with torch.no_grad():
            return distill_loss(student(input_ids=ids).logits, dense(input_ids=ids).logits).item()

    start = gap()
    cfg = TrainConfig(mode="end2end", train_router=False, train_experts=True, distill_weight=1.0, lr=3e-3,
                      max_steps=20, batch_size=4, save_every=0)
    train(student, dense, TrainData(ids), cfg, progress=False)
    assert gap() < 0.7 * start
    moved = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {f"model.layers.1.mlp.{w}" for w in ("w_in", "w_up", "w_out")}


def test_layerwise_reconstruction_brings_a_sparse_ffn_closer_to_the_dense_one():
    dense = tiny_model("gpt2")
    student = sparsify_(copy.deepcopy(dense), SparsityConfig(0.5, 0.5))
    ids = token_batch(8, 16)
    seen = []  # layer 1's real input in the dense model: what the layer-wise stage trains on
    hook = dense.transformer.h[1].mlp.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        dense(input_ids=ids)
    hook.remove()
    x = seen[0]
    target = adapter_for(dense.transformer.h[1].mlp).read(dense.transformer.h[1].mlp)

    def err():
        with torch.no_grad():
            return (student.transformer.h[1].mlp(x) - target(x)).square().mean().item()

    start = err()
    cfg = TrainConfig(mode="layerwise", train_router=False, train_experts=True, recon_weight=1.0, lr=1e-2,
                      max_steps=30, token_batch=64, layerwise_tokens=128, save_every=0)
    train(student, dense, TrainData(ids), cfg, progress=False)
    assert err() < 0.8 * start


def test_training_a_sparse_model_asks_for_train_router_false():
    dense = tiny_model("llama")
    student = sparsify_(copy.deepcopy(dense), SparsityConfig(0.5, 0.5))
    cfg = TrainConfig(mode="end2end", train_experts=True, distill_weight=1.0, max_steps=1, save_every=0)
    with pytest.raises(ValueError, match="set train_router=False"):
        train(student, dense, TrainData(token_batch(2, 16)), cfg, progress=False)


def test_a_teacher_of_another_ffn_width_is_a_clear_error():
    dense = tiny_model("llama")
    student = sparsify_(copy.deepcopy(dense), SparsityConfig(0.5, 0.5))
    other = copy.deepcopy(dense)
    config = copy.deepcopy(dense.config)
    config.intermediate_size = 48
    other.model.layers[1].mlp = type(dense.model.layers[1].mlp)(config)
    cfg = TrainConfig(mode="end2end", train_router=False, train_experts=True, distill_weight=1.0, max_steps=1,
                      save_every=0)
    with pytest.raises(ValueError, match="FFN width 48 != 64; pass the dense model"):
        train(student, other, TrainData(token_batch(2, 16)), cfg, progress=False)
