"""save then load gives the same model; load refuses what is not a factorllm save."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_model, token_batch

from factorllm import FactorConfig, convert_, load, load_model, save


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
    with pytest.raises(ValueError, match="convert_ first"):
        save(llama, tmp_path / "m")
