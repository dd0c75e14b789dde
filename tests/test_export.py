"""Export to stock formats: stock transformers loads the result and computes the same logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model, token_batch
from transformers import AutoModelForCausalLM

from factorllm import FactorConfig, convert_, export
from factorllm.export import gguf_tensor_map

CALIB = [token_batch(2, 32, seed=1)]

EXPORTABLE = [
    ("llama", "mixtral", FactorConfig(4, 2, gating="softmax_renorm", router="linear_nobias", partition="kmeans")),
    ("mistral", "mixtral", FactorConfig(8, 2, gating="softmax_renorm", router="linear_nobias")),
    ("llama", "mixtral", FactorConfig(4, 1, gating="hard", router="linear_nobias")),  # E/k folded into w2
    ("llama", "mixtral", FactorConfig(4, 2, gating="softmax_renorm")),  # untrained linear router: zero bias
    ("llama", "qwen2_moe", FactorConfig(4, 2, gating="softmax", router="linear_nobias")),
    ("llama", "qwen2_moe", FactorConfig(4, 2, gating="softmax_renorm", router="linear_nobias", shared_neurons=16,
                                        partition="coactivation")),
    ("qwen2", "qwen2_moe", FactorConfig(4, 2, gating="softmax_renorm", router="linear_nobias")),
    ("qwen2", "qwen2_moe", FactorConfig(8, 3, gating="softmax", router="linear_nobias", shared_neurons=32,
                                        partition="importance")),
    ("llama", "qwen2_moe", FactorConfig(4, 2, gating="softmax_renorm", router="linear_nobias", dense_layers=(0,))),
]


def _train_router_a_little(model):
    """Routers with non-trivial weights, so routing is not an accident of initialisation."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".router." in name and p.dim() == 2:
                p.normal_(0, 1.0)


@pytest.mark.parametrize("family,fmt,cfg", EXPORTABLE)
def test_export_loads_in_stock_transformers_with_same_logits(tmp_path, family, fmt, cfg):
    model = convert_(tiny_model(family), cfg, calib=CALIB, progress=False)
    _train_router_a_little(model)
    ids = token_batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    export(model, tmp_path / "out", fmt)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(stock).__name__ == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[fmt]
    assert "factorllm" not in type(stock).__module__
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, want, atol=1e-4, rtol=0)


def test_mixtral_export_uses_per_expert_checkpoint_names(tmp_path):
    from safetensors import safe_open

    model = convert_(tiny_model("llama"), FactorConfig(4, 2, gating="softmax_renorm"), progress=False)
    export(model, tmp_path / "out", "mixtral")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.3.w1.weight",
            "model.layers.1.block_sparse_moe.experts.3.w2.weight",
            "model.layers.1.block_sparse_moe.experts.3.w3.weight"} <= keys
    assert not any(".mlp." in k for k in keys)


@pytest.mark.parametrize("gguf_type,tol", [("f32", 0.0), ("f16", 2e-3), ("q8_0", 2e-2), ("q4_0", 0.2)])
def test_gguf_reads_back_with_expected_names_shapes_metadata_and_values(tmp_path, gguf_type, tol):
    import gguf

    model = convert_(tiny_model("llama"), FactorConfig(4, 2, gating="softmax_renorm", router="linear_nobias"),
                     progress=False)
    path = export(model, tmp_path / "m.gguf", "gguf", gguf_type=gguf_type)
    reader = gguf.GGUFReader(str(path))
    meta = {f.name: f.contents() for f in reader.fields.values()}
    assert meta["general.architecture"] == "llama"
    assert meta["llama.expert_count"] == 4 and meta["llama.expert_used_count"] == 2
    assert meta["llama.block_count"] == 2 and meta["llama.feed_forward_length"] == 16
    want = gguf_tensor_map(model)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    assert set(got) >= {"blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight",
                        "blk.1.ffn_gate_inp.weight", "token_embd.weight", "output.weight"}
    for name, t in got.items():
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want[name].shape)
        assert list(reversed(t.shape.tolist())) == list(want[name].shape), name  # ggml lists dims innermost first
        np.testing.assert_allclose(values, want[name].numpy(), atol=tol * float(want[name].abs().max()), rtol=0,
                                   err_msg=name)


def test_gguf_rope_rows_are_llama_cpp_order():
    from factorllm.export import _rope_rows_for_gguf

    # one head, head_dim 4: transformers' halves [x0 x1 | x2 x3] pair (0,2), (1,3); llama.cpp interleaves them
    w = torch.arange(4.0)[:, None]
    assert _rope_rows_for_gguf(w, heads=1).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]


@pytest.mark.parametrize("family,fmt,cfg,message", [
    ("llama", "mixtral", FactorConfig(4, 2, gating="hard"), "gating='softmax_renorm'"),
    ("llama", "gguf", FactorConfig(4, 2, gating="softmax"), "gating='softmax_renorm'"),
    ("llama", "gguf", FactorConfig(4, 2, gating="hard"), "or hard gating with top_k=1"),
    ("llama", "gguf", FactorConfig(3, 2, gating="softmax_renorm", expert_sizes=(16, 16, 32)), "equal expert sizes"),
    ("llama", "mixtral", FactorConfig(3, 2, gating="softmax_renorm", expert_sizes=(16, 16, 32)), "equal expert sizes"),
    ("llama", "mixtral", FactorConfig(4, 2, gating="softmax_renorm", shared_neurons=16), "use format 'qwen2_moe'"),
    ("qwen2", "mixtral", FactorConfig(4, 2, gating="softmax_renorm"), "'qwen2_moe' for Qwen2"),
    ("gpt2", "qwen2_moe", FactorConfig(4, 2, gating="softmax_renorm"), "Llama, Mistral or Qwen2"),
    ("llama", "mixtral", FactorConfig(4, 2, gating="oracle"), "pick a real gating"),
    ("llama", "mixtral", FactorConfig(4, 2, gating="softmax_renorm", router="mlp"), "router='linear_nobias'"),
    ("llama-bias", "mixtral", FactorConfig(4, 2, gating="softmax_renorm"), "without mlp_bias"),
    ("llama", "mixtral", FactorConfig(4, 2, gating="softmax_renorm", dense_layers=(1,)), "layer 1 is dense.*qwen2_moe"),
    ("llama", "gguf", FactorConfig(4, 2, gating="softmax_renorm", dense_layers=(0,)), "layer 0 is dense"),
])
def test_refusals_name_the_fix(tmp_path, family, fmt, cfg, message):
    model = convert_(tiny_model(family), cfg, calib=CALIB, progress=False)
    with pytest.raises(ValueError, match=f"cannot export to {fmt}:.*{message}".replace("(", r"\(")):
        export(model, tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


def test_trained_router_bias_is_refused(tmp_path):
    model = convert_(tiny_model("llama"), FactorConfig(4, 2, gating="softmax_renorm"), progress=False)
    with torch.no_grad():
        model.model.layers[0].mlp.router.net.bias[0] = 0.1
    with pytest.raises(ValueError, match="non-zero bias.*router='linear_nobias'"):
        export(model, tmp_path / "out", "mixtral")


def test_export_refuses_dense_model_and_existing_output(tmp_path):
    with pytest.raises(ValueError, match="convert_ first"):
        export(tiny_model("llama"), tmp_path / "a", "mixtral")
    model = convert_(tiny_model("llama"), FactorConfig(4, 2, gating="softmax_renorm"), progress=False)
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        export(model, tmp_path / "b", "mixtral")
    export(model, tmp_path / "b", "mixtral", overwrite=True)
    assert (tmp_path / "b" / "config.json").exists()


def test_cli_export(tmp_path, tiny_folder, capsys):
    from factorllm.cli.main import main

    assert main(["convert", "--model", str(tiny_folder), "--experts", "4", "--top-k", "2", "--partition",
                 "contiguous", "--gating", "softmax_renorm", "--router", "linear_nobias",
                 "--output", str(tmp_path / "moe")]) == 0
    assert main(["export", "--model", str(tmp_path / "moe"), "--format", "mixtral",
                 "--output", str(tmp_path / "mix")]) == 0
    # The test tokenizer is character-level (WordLevel): GGUF cannot hold it, and the error says what works.
    assert main(["export", "--model", str(tmp_path / "moe"), "--format", "gguf",
                 "--output", str(tmp_path / "m.gguf")]) == 2
    assert "pass tokenizer_gguf=" in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "mix")
    assert stock.config.num_local_experts == 4


def test_dense_llama_writes_a_dense_gguf(tmp_path):
    import gguf

    dense = tiny_model("llama")
    path = export(dense, tmp_path / "d.gguf", "gguf")
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert {"blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"} <= names
    assert not any("exps" in n for n in names)
    meta = {f.name: f.contents() for f in reader.fields.values()}
    assert meta["llama.feed_forward_length"] == 64 and "llama.expert_count" not in meta
    with pytest.raises(ValueError, match="dense 'gpt2' models"):
        export(tiny_model("gpt2"), tmp_path / "g.gguf", "gguf")
