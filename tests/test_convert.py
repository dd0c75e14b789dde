"""convert_: every family, every partition, all experts on reproduces the dense model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, FFN, tiny_model, token_batch

from factorllm import FactorConfig, convert_, moe_layers, set_routing_
from factorllm.adapters import find_ffns
from factorllm.partition import PARTITIONS

CALIB = [token_batch(2, 32, seed=1)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("partition", PARTITIONS.names())
def test_all_experts_on_reproduce_dense_logits(family, partition):
    dense = tiny_model(family)
    ids = token_batch()
    with torch.no_grad():
        want = dense(input_ids=ids).logits
    moe = convert_(copy.deepcopy(dense), FactorConfig(8, 8, partition=partition), calib=CALIB, progress=False)
    assert len(moe_layers(moe)) == 2
    with torch.no_grad():
        got = moe(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_expert_and_unequal_sizes_reproduce_dense(family):
    dense = tiny_model(family)
    ids = token_batch()
    with torch.no_grad():
        want = dense(input_ids=ids).logits
    cfg = FactorConfig(3, 3, partition="coactivation", shared_neurons=8, expert_sizes=(8, 16, 32))
    moe = convert_(copy.deepcopy(dense), cfg, calib=CALIB, progress=False)
    block = moe_layers(moe)[0][1]
    assert block.shared.sizes == [8] and block.experts.sizes == [8, 16, 32]
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=ids).logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dense_layers_keep_their_ffn_and_the_other_layers_are_cut_as_in_a_full_conversion(family):
    dense = tiny_model(family)
    names = [n for n, _ in find_ffns(dense)]
    student = copy.deepcopy(dense)
    kept = student.get_submodule(names[0])
    moe = convert_(student, FactorConfig(4, 4, gating="sum", dense_layers=(0,)), progress=False)
    assert moe.get_submodule(names[0]) is kept and [n for n, _ in moe_layers(moe)] == names[1:]
    full = convert_(copy.deepcopy(dense), FactorConfig(4, 4, gating="sum"), progress=False)
    a, b = moe.get_submodule(names[1]), full.get_submodule(names[1])  # same partition and router seed (layer 1's)
    assert torch.equal(a.neuron_index, b.neuron_index)
    assert all(torch.equal(p, q) for p, q in zip(a.router.parameters(), b.router.parameters(), strict=True))
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers,msg", [((2,), "the model has layers 0..1"), ((0, 1), "leaves no layer")])
def test_dense_layers_out_of_range_or_all_are_clear_errors(llama, layers, msg):
    with pytest.raises(ValueError, match=msg):
        convert_(llama, FactorConfig(4, 2, dense_layers=layers), progress=False)
    with pytest.raises(ValueError, match="layer indices >= 0"):
        FactorConfig(4, 2, dense_layers=(-1,))


def test_oracle_with_all_experts_is_dense_and_fewer_experts_change_output(llama):
    ids = token_batch()
    with torch.no_grad():
        want = llama(input_ids=ids).logits
    moe = convert_(copy.deepcopy(llama), FactorConfig(4, 4, gating="oracle"), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        set_routing_(moe, top_k=2)
        assert (moe(input_ids=ids).logits - want).abs().max() > 1e-3


def test_partitions_are_disjoint_covers_and_data_driven_ones_differ(llama):
    index = {}
    for name in PARTITIONS.names():
        moe = convert_(copy.deepcopy(llama), FactorConfig(4, 1, partition=name), calib=CALIB, progress=False)
        idx = moe_layers(moe)[0][1].neuron_index
        assert torch.equal(idx.sort().values, torch.arange(FFN)), name
        index[name] = idx
    assert torch.equal(index["contiguous"], torch.arange(FFN))
    for name in ("random", "kmeans", "coactivation", "importance"):
        assert not torch.equal(index[name], index["contiguous"]), name


def test_importance_puts_most_used_neurons_in_expert_zero(llama):
    moe = convert_(copy.deepcopy(llama), FactorConfig(4, 1, partition="importance"), calib=CALIB, progress=False)
    from factorllm.adapters import adapter_for
    from factorllm.convert import collect_activations

    dense_ffns = [("model.layers.0.mlp", llama.model.layers[0].mlp)]
    acts = collect_activations(llama, dense_ffns, CALIB, progress=False)["model.layers.0.mlp"]
    usage = acts.abs().mean(0)
    block = moe_layers(moe)[0][1]
    first = block.neuron_index[: FFN // 4]
    assert set(first.tolist()) == set(usage.topk(FFN // 4).indices.tolist())
    assert adapter_for(llama.model.layers[0].mlp)


def _ffn_input(model, ids, layer=1):
    """The real input of layer `layer`'s FFN on `ids`: [B, S, D]."""
    seen = []
    handle = model.model.layers[layer].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen[0]


def test_coactivation_beats_contiguous_under_the_oracle():
    """Clustering neurons that fire together concentrates a token's output in few experts."""
    dense = tiny_model("llama")
    calib = [token_batch(4, 64, seed=2)]
    ffn_in = _ffn_input(dense, token_batch(2, 32, seed=3))
    with torch.no_grad():
        want = dense.model.layers[1].mlp(ffn_in)
    errs = {}
    for name in ("contiguous", "coactivation"):
        moe = convert_(copy.deepcopy(dense), FactorConfig(8, 2, partition=name, gating="oracle"),
                       calib=calib, progress=False)
        with torch.no_grad():
            got = moe.model.layers[1].mlp(ffn_in)
        errs[name] = ((got - want).norm() / want.norm()).item()
    assert errs["coactivation"] < errs["contiguous"], errs


def test_converted_model_generates(llama):
    moe = convert_(copy.deepcopy(llama), FactorConfig(4, 2, gating="softmax_renorm"), progress=False)
    out = moe.generate(token_batch(1, 5), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("family", ["llama-bias", "gpt2"])
def test_to_dense_weights_rebuilds_the_original_ffn(family):
    from factorllm.adapters import adapter_for

    dense = tiny_model(family)
    original = adapter_for(dense.get_submodule(_first_mlp(dense))).read(dense.get_submodule(_first_mlp(dense)))
    moe = convert_(copy.deepcopy(dense), FactorConfig(3, 1, partition="coactivation", shared_neurons=4,
                                                      expert_sizes=(10, 20, 30)), calib=CALIB, progress=False)
    rebuilt = moe.get_submodule(_first_mlp(dense)).to_dense_weights()
    for name in ("w_in", "w_up", "w_out", "b_in", "b_up", "b_out"):
        a, b = getattr(original, name), getattr(rebuilt, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a.detach(), atol=0, rtol=0, msg=name)


def _first_mlp(model):
    from factorllm.adapters import find_ffns

    return find_ffns(model)[0][0]
