"""Every bad input gets a clear error that names the fix."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import token_batch

from factorllm import FactorConfig, convert_, load_model, perplexity


def test_unsupported_architecture_names_the_model_and_families():
    import transformers as tf

    opt = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                         num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(ValueError, match="unsupported architecture OPTForCausalLM.*gated"):
        convert_(opt, FactorConfig(2, 1), progress=False)


def test_unsupported_ffn_class_is_named(llama):
    class StrangeFFN(torch.nn.Module):
        def forward(self, x):
            return x

    llama.model.layers[1].mlp = StrangeFFN()
    with pytest.raises(ValueError, match="unsupported FFN class StrangeFFN.*supports the families"):
        convert_(llama, FactorConfig(2, 1), progress=False)


def test_equal_split_impossible_names_working_expert_counts(llama):
    with pytest.raises(ValueError, match=r"cannot split 64 neurons into 7 equal experts.*num_experts in \[2, 4"):
        convert_(llama, FactorConfig(7, 2), progress=False)
    with pytest.raises(ValueError, match="expert_sizes sum to 30"):
        convert_(llama, FactorConfig(2, 1, expert_sizes=(10, 20)), progress=False)


@pytest.mark.parametrize("top_k", [0, 9, -1])
def test_top_k_out_of_range(top_k):
    with pytest.raises(ValueError, match=r"1 <= top_k <= num_experts=8"):
        FactorConfig(8, top_k)


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match=r"unknown partition 'spectral'; choose one of \['coactivation'"):
        FactorConfig(8, 2, partition="spectral")
    with pytest.raises(ValueError, match="unknown gating"):
        FactorConfig(8, 2, gating="sigmoid")


@pytest.mark.parametrize("kw", [{"partition": "coactivation"}, {"partition": "importance"}, {"shared_neurons": 8}])
def test_data_driven_partition_without_calibration(llama, kw):
    with pytest.raises(ValueError, match="needs calibration data: pass calib="):
        convert_(llama, FactorConfig(4, 2, **kw), progress=False)


def test_converting_twice_is_refused(llama):
    convert_(llama, FactorConfig(4, 2), progress=False)
    with pytest.raises(ValueError, match="already factorized"):
        convert_(llama, FactorConfig(4, 2), progress=False)


def test_failed_conversion_leaves_the_model_dense(llama):
    before = copy.deepcopy(llama.state_dict())
    with pytest.raises(ValueError):
        convert_(llama, FactorConfig(7, 2), progress=False)
    after = llama.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_load_model_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))
    with pytest.raises(FileNotFoundError, match="check the path"):
        load_model(str(tmp_path / "missing" / "folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_perplexity_bad_windows(llama):
    ids = token_batch(1, 100).reshape(-1)
    with pytest.raises(ValueError, match="longer than the model's context"):
        perplexity(llama, ids, window=1000)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(llama, ids[:10], window=64)


def test_model_from_folder_and_perplexity_convention(tiny_folder):
    model, tok = load_model(str(tiny_folder))
    ids = torch.tensor(tok("In the beginning God created the heaven and the earth." * 4)["input_ids"])
    ppl = perplexity(model, ids, window=64)
    # Recompute by hand: non-overlapping windows, each scored from an empty context.
    wins = ids[: len(ids) // 64 * 64].view(-1, 64)
    with torch.no_grad():
        logits = model(input_ids=wins).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), wins[:, 1:].reshape(-1))
    assert ppl == pytest.approx(nll.exp().item(), rel=1e-5)
