"""The embedded SmolLM2-135M, end to end. Slow (about a minute): `make test-slow`."""

from __future__ import annotations

import copy

import pytest
import torch

from factorllm import FactorConfig, convert_, load, load_model, perplexity, save
from factorllm.data import kjv_text, pydoc_text, tokenize, windows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_embedded_model_is_the_real_smollm2(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.intermediate_size == 1536
    ids = windows(tokenize(tok, pydoc_text()), 256, count=2, seed=0).reshape(-1)
    assert perplexity(model, ids, window=256) < 40  # a trained model, not random weights (vocab 49k)


def test_factorized_smollm2_all_on_is_dense_and_round_trips(smollm2, tmp_path):
    model, tok = smollm2
    ids = windows(tokenize(tok, pydoc_text()), 128, count=2, seed=0)
    calib = [windows(tokenize(tok, kjv_text("train"), max_tokens=4096), 256, count=4, seed=0)]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    moe = convert_(copy.deepcopy(model), FactorConfig(32, 32, partition="coactivation"), calib=calib,
                   progress=False)
    with torch.no_grad():
        got = moe(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    save(moe, tmp_path / "m", tok)
    again, tok2 = load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, got, atol=0, rtol=0)
    assert tok2("In the beginning")["input_ids"] == tok("In the beginning")["input_ids"]


def test_smollm2_exports_to_mixtral_and_generates_the_same_tokens(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from factorllm import export

    model, tok = smollm2
    moe = convert_(copy.deepcopy(model), FactorConfig(8, 2, gating="softmax_renorm"), progress=False)
    export(moe, tmp_path / "mixtral", "mixtral", tokenizer=tok)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    prompt = tok("The Python for statement", return_tensors="pt").input_ids
    gen = dict(max_new_tokens=32, do_sample=False, min_new_tokens=32)
    with torch.no_grad():
        ours = moe.generate(prompt, **gen)
        theirs = stock.generate(prompt, **gen)
    assert ours.shape[1] == prompt.shape[1] + 32
    assert theirs.tolist() == ours.tolist()


def test_smollm2_gguf_export_carries_the_source_tokenizer(smollm2, tmp_path):
    import gguf

    from factorllm import export
    from factorllm.loading import embedded_gguf

    model, tok = smollm2
    moe = convert_(copy.deepcopy(model), FactorConfig(8, 2, gating="softmax_renorm"), progress=False)
    path = export(moe, tmp_path / "m.gguf", "gguf", tokenizer=tok, gguf_type="q8_0",
                  tokenizer_gguf=str(embedded_gguf("smollm2-135m")))
    fields = {f.name: f for f in gguf.GGUFReader(str(path)).fields.values()}
    src = {f.name: f for f in gguf.GGUFReader(str(embedded_gguf("smollm2-135m"))).fields.values()}
    assert fields["tokenizer.ggml.model"].contents() == src["tokenizer.ggml.model"].contents()
    assert fields["tokenizer.ggml.tokens"].contents() == src["tokenizer.ggml.tokens"].contents()
    assert fields["llama.expert_count"].contents() == 8


def test_llamacpp_runs_the_exported_moe_gguf_like_torch(smollm2, tmp_path):
    """The exported 8-expert SmolLM2 GGUF (F32) continues a fixed prompt in llama.cpp as the factorllm model
    does in torch, for at least the first 16 of 32 greedy tokens."""
    pytest.importorskip("llama_cpp", reason="pip install 'factorllm[llamacpp]'")
    from factorllm import export
    from factorllm.benchmark import llamacpp_greedy, llamacpp_model
    from factorllm.loading import embedded_gguf

    model, tok = smollm2
    moe = convert_(copy.deepcopy(model), FactorConfig(8, 2, gating="softmax_renorm", router="linear_nobias",
                                                      partition="importance"),
                   calib=[windows(tokenize(tok, kjv_text("train"), max_tokens=2048), 256, count=4, seed=0)],
                   progress=False)
    path = export(moe, tmp_path / "moe.gguf", "gguf", tokenizer=tok, gguf_type="f32",
                  tokenizer_gguf=str(embedded_gguf("smollm2-135m")))
    prompt = tok("The Python for statement is used to", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ours = moe.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    ours = ours[0, len(prompt):].tolist()
    llm = llamacpp_model(str(path), threads=2)
    theirs, _ = llamacpp_greedy(llm, prompt, 32)
    llm.close()
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), 32)
    print(f"llama.cpp and torch agree on the first {agree} of 32 greedy tokens")
    assert agree >= 16, (tok.decode(ours), tok.decode(theirs))
