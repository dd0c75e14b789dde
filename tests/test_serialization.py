"""save then load gives the same model (factorized or sparsified); load refuses what is not a factorllm save."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_model, token_batch

from factorllm import FactorConfig, convert_, load, load_model, save
from factorllm.adapters import adapter_for, find_ffns
from factorllm.sparsity import SparsityConfig, densify_, sparse_layers, sparsify_


@pytest.mark.parametrize("family,cfg", [
    ("llama", FactorConfig(8, 2, partition="coactivation", gating="softmax_renorm", router="mlp")),
    ("gpt2", FactorConfig(4, 1, partition="kmeans", gating="hard", shared_neurons=16)),
    ("qwen2", FactorConfig(3, 2, partition="random", expert_sizes=(8, 24, 32), gating="softmax")),
    ("llama", FactorConfig(4, 2, gating="sum", dense_layers=(1,))),
])
def test_save_load_same_logits(tmp_path, family, cfg):
    model = convert_(tiny_model(family), cfg, calib=[token_batch(2, 32, seed=1)], progress=False)
    ids = token_batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save(model, tmp_path / "m")
    loaded, tok = load(tmp_path / "m")
    assert tok is None
    assert loaded.factor_config == cfg
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=0, rtol=0)
    # load_model dispatches a factorllm folder to load()
    again, _ = load_model(str(tmp_path / "m"))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, want, atol=0, rtol=0)


def test_save_refuses_existing_folder_and_keeps_it(tmp_path, llama):
    model = convert_(copy.deepcopy(llama), FactorConfig(4, 2), progress=False)
    target = tmp_path / "m"
    target.mkdir()
    (target / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite"):
        save(model, target)
    assert (target / "mine.txt").read_text() == "user data"
    save(model, target, overwrite=True)
    assert not (target / "mine.txt").exists() and (target / "factorllm.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left behind


def test_load_refuses_a_folder_that_is_not_a_factorllm_save(tmp_path, llama):
    llama.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="not a factorllm save"):
        load(tmp_path / "dense")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load(tmp_path / "nowhere")


def test_load_refuses_a_newer_format(tmp_path, llama):
    model = convert_(copy.deepcopy(llama), FactorConfig(4, 2), progress=False)
    save(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "factorllm.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "m" / "factorllm.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="upgrade factorllm"):
        load(tmp_path / "m")


def test_save_refuses_a_dense_model(tmp_path, llama):
    with pytest.raises(ValueError, match="call factorllm.convert_ or factorllm.sparsify_ first"):
        save(llama, tmp_path / "m")


@pytest.mark.parametrize("family,exact,chooser", [("llama", False, False), ("gpt2", True, False),  # gpt2: Conv1D
                                                   ("llama", True, True)])
def test_a_sparsified_model_saves_as_a_stock_checkpoint_and_loads_back_sparse(tmp_path, family, exact, chooser):
    from transformers import AutoModelForCausalLM

    model = sparsify_(tiny_model(family), SparsityConfig(0.5, 0.4, dense_layers=(1,), exact_neurons=exact))
    block = sparse_layers(model)[0][1]
    if chooser:
        block.add_chooser()  # perturbed below like the rest: a chooser that differs from the FFN's weights
    with torch.no_grad():  # as fine-tuning would: weights that differ from the dense model's
        for p in block.parameters():
            p.add_(0.05 * torch.randn_like(p))
    block.neuron_keep = 0.6  # a layer's own keep survives too
    ids = token_batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        want_dense = densify_(copy.deepcopy(model))(input_ids=ids).logits
    save(model, tmp_path / "m")
    loaded, _ = load(tmp_path / "m")
    assert loaded.sparsity_config == model.sparsity_config
    assert sparse_layers(loaded)[0][1].neuron_keep == 0.6
    assert (sparse_layers(loaded)[0][1].chooser_in is not None) == chooser
    assert (tmp_path / "m" / "chooser.safetensors").exists() == chooser
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # no factorllm code: the dense FFNs, new weights
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=0, rtol=0)
        torch.testing.assert_close(stock(input_ids=ids).logits, want_dense, atol=1e-6, rtol=1e-6)
        assert (want - want_dense).abs().max() > 1e-3  # the sparse and the dense runs do differ


def test_a_missing_or_mismatched_chooser_file_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    model = sparsify_(tiny_model("llama"), SparsityConfig(0.5, 0.4, exact_neurons=True))
    for _, block in sparse_layers(model):
        block.add_chooser()
    save(model, tmp_path / "m")
    chooser = tmp_path / "m" / "chooser.safetensors"
    save_file({"model.layers.0.mlp.chooser_in": torch.zeros(64, 32)}, str(chooser))  # layer 1's and up's: gone
    with pytest.raises(ValueError, match="chooser.safetensors does not match"):
        load(tmp_path / "m")
    chooser.unlink()
    with pytest.raises(ValueError, match="chooser.safetensors is missing"):
        load(tmp_path / "m")


@pytest.mark.parametrize("family", ["llama", "llama-bias", "gpt2", "gpt_neox"])
def test_densify_undoes_sparsify_and_keeps_the_sparse_weights(family):
    dense = tiny_model(family)
    model = sparsify_(copy.deepcopy(dense), SparsityConfig(0.5, 0.5))
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(densify_(copy.deepcopy(model))(input_ids=ids).logits, dense(input_ids=ids).logits,
                                   atol=0, rtol=0)
        block = sparse_layers(model)[0][1]
        block.w_out.mul_(0.5)
        back = densify_(model)
    assert not sparse_layers(back) and not hasattr(back, "sparsity_config")
    mlp = find_ffns(back)[0][1]
    torch.testing.assert_close(adapter_for(mlp).read(mlp).w_out, block.w_out, atol=0, rtol=0)
