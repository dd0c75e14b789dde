"""The `factorllm` command line, run in-process on a tiny model folder."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from factorllm import load, moe_layers
from factorllm.cli.main import main


def test_convert_writes_a_loadable_model_with_tokenizer(tiny_folder, tmp_path):
    out = tmp_path / "moe"
    rc = main(["convert", "--model", str(tiny_folder), "--experts", "4", "--top-k", "2",
               "--partition", "coactivation", "--calib-tokens", "256", "--calib-window", "64", "--output", str(out),
               "--dense-layers", "0"])
    assert rc == 0
    model, tok = load(out)
    assert tok is not None and model.factor_config.partition == "coactivation"
    assert model.factor_config.dense_layers == (0,) and [n for n, _ in moe_layers(model)] == ["model.layers.1.mlp"]
    with torch.no_grad():
        assert model(input_ids=torch.tensor([tok("Amen.")["input_ids"]])).logits.isfinite().all()


def test_convert_refuses_existing_output_unless_overwrite(tiny_folder, tmp_path, capsys):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["convert", "--model", str(tiny_folder), "--partition", "contiguous", "--experts", "4",
            "--output", str(out)]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main([*args, "--overwrite"]) == 0
    assert (out / "factorllm.json").exists()


@pytest.mark.parametrize("bad,message", [
    (["--top-k", "9"], "1 <= top_k <= num_experts=8"),
    (["--experts", "7"], "cannot split 64 neurons into 7 equal experts"),
])
def test_convert_bad_input_is_one_clear_line(tiny_folder, tmp_path, capsys, bad, message):
    rc = main(["convert", "--model", str(tiny_folder), "--partition", "contiguous",
               "--output", str(tmp_path / "o"), *bad])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_help_is_fast_and_lists_convert():
    out = subprocess.run([sys.executable, "-m", "factorllm.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "convert" in out.stdout


def test_train_cli_trains_routers_and_saves(tiny_folder, tmp_path):
    moe = tmp_path / "moe"
    assert main(["convert", "--model", str(tiny_folder), "--experts", "4", "--top-k", "2", "--partition",
                 "contiguous", "--gating", "sum", "--output", str(moe)]) == 0
    before, _ = load(moe)
    text = tmp_path / "corpus.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 40)
    rc = main(["train", "--model", str(moe), "--data", str(text), "--window", "64", "--tokens", "1024",
               "--steps", "3", "--token-batch", "64", "--output", str(tmp_path / "run")])
    assert rc == 0
    after, _ = load(tmp_path / "run" / "model")
    w0 = before.model.layers[0].mlp.router.net.weight
    assert not torch.equal(w0, after.model.layers[0].mlp.router.net.weight)
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    # an existing run is not overwritten by accident
    assert main(["train", "--model", str(moe), "--data", str(text), "--window", "64", "--tokens", "1024",
                 "--steps", "3", "--output", str(tmp_path / "run")]) == 2


def test_sparsify_then_train_the_sparse_ffns_from_the_cli(tiny_folder, tmp_path, capsys):
    from factorllm.sparsity import sparse_layers

    sparse = tmp_path / "sparse"
    assert main(["sparsify", "--model", str(tiny_folder), "--input-keep", "0.6", "--compute", "0.75",
                 "--dense-layers", "0", "--output", str(sparse)]) == 0
    assert "75.0% of the FFN compute over 2 layers" in capsys.readouterr().out  # layer 0 dense, layer 1 at 50%
    before, tok = load(sparse)
    assert tok is not None and [n for n, _ in sparse_layers(before)] == ["model.layers.1.mlp"]
    assert before.sparsity_config.neuron_keep == pytest.approx(0.3)
    text = tmp_path / "corpus.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 40)
    run = ["train", "--model", str(sparse), "--data", str(text), "--window", "64", "--tokens", "1024", "--steps", "2",
           "--batch-size", "2", "--mode", "end2end", "--lr", "1e-3"]
    assert main([*run, "--train", "router", "--output", str(tmp_path / "r0")]) == 2  # no routers: says so
    assert "train_router=False" in capsys.readouterr().err
    assert main([*run, "--train", "experts", "--output", str(tmp_path / "r1")]) == 0  # teacher: the recorded source
    after, _ = load(tmp_path / "r1" / "model")
    w = lambda m: sparse_layers(m)[0][1].w_out  # noqa: E731
    assert not torch.equal(w(before), w(after))
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "r1" / "model"), "--window", "64", "--eval-windows", "1",
                 "--cloze", "0", "--tasks", "none"]) == 0
    assert "ppl: pydoc" in capsys.readouterr().out


@pytest.mark.parametrize("bad,message", [
    (["--neuron-keep", "1.5"], "neuron_keep=1.5 must be in (0, 1]"),
    (["--compute", "0.2"], "choose input_keep in"),  # 0.6 of the inputs already costs more than 20%
    (["--compute", "0.4", "--dense-layers", "0"], "dense layers alone run 50% of the FFN compute"),
])
def test_sparsify_bad_input_is_one_clear_line(tiny_folder, tmp_path, capsys, bad, message):
    rc = main(["sparsify", "--model", str(tiny_folder), "--input-keep", "0.6", "--output", str(tmp_path / "o"), *bad])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_sparsify_chooses_the_input_share_on_calibration_text(tiny_folder, tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 40)
    out = tmp_path / "sparse"
    assert main(["sparsify", "--model", str(tiny_folder), "--compute", "0.5", "--calib-data", str(text),
                 "--calib-tokens", "128", "--calib-window", "64", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("input share"))
    scores = dict(pair.split() for pair in line.rsplit(" -> ", 1)[0].rsplit(": ", 1)[1].split(", "))  # share: loss
    model, _ = load(out)
    chosen = model.sparsity_config.input_keep
    assert len(scores) > 1 and f"{chosen:.2f}" == min(scores, key=lambda k: float(scores[k]))
    assert "128 tokens of" in printed and "50.0% of the FFN compute" in printed
    rc = main(["sparsify", "--model", str(tiny_folder), "--neuron-keep", "0.3", "--output", str(tmp_path / "o")])
    assert rc == 2 and "--neuron-keep needs --input-keep" in capsys.readouterr().err


def test_sparsify_fits_a_learned_chooser_and_saves_it(tiny_folder, tmp_path, capsys):
    from factorllm.sparsity import sparse_layers

    text = tmp_path / "corpus.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 40)
    out = tmp_path / "sparse"
    assert main(["sparsify", "--model", str(tiny_folder), "--input-keep", "0.25", "--neuron-keep", "0.25",
                 "--exact-neurons", "--chooser-steps", "5", "--calib-data", str(text), "--calib-tokens", "256",
                 "--calib-window", "64", "--output", str(out)]) == 0
    assert "learned chooser: 5 steps a layer on 256 tokens" in capsys.readouterr().out
    model, _ = load(out)
    assert all(b.chooser_in is not None for _, b in sparse_layers(model))
    run = ["train", "--model", str(out), "--data", str(text), "--window", "64", "--tokens", "256", "--steps", "2",
           "--batch-size", "2", "--mode", "end2end", "--train", "experts", "--lr", "1e-3"]
    for weight in ("0", "1"):  # frozen, then trained along
        assert main([*run, "--chooser-weight", weight, "--chooser-lr", "1e-2", "--output", str(tmp_path / weight)]) == 0
        trained, _ = load(tmp_path / weight / "model")
        moved = [not torch.equal(a.chooser_in, b.chooser_in)
                 for (_, a), (_, b) in zip(sparse_layers(model), sparse_layers(trained), strict=True)]
        assert all(moved) if weight == "1" else not any(moved)
    rc = main(["sparsify", "--model", str(tiny_folder), "--input-keep", "0.25", "--neuron-keep", "0.25",
               "--chooser-steps", "5", "--output", str(tmp_path / "o")])
    assert rc == 2 and "with --exact-neurons" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_eval_cli_on_a_factorized_tiny_model(tiny_folder, tmp_path, capsys):
    import json

    moe = tmp_path / "moe"
    assert main(["convert", "--model", str(tiny_folder), "--experts", "4", "--top-k", "2", "--partition",
                 "contiguous", "--output", str(moe)]) == 0
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(moe), "--window", "64", "--eval-windows", "2", "--cloze", "4",
                 "--tasks", "piqa,boolq", "--task-limit", "4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["ppl"]) == {"pydoc", "kjv"} and set(res["accuracy"]) == {"piqa", "boolq"}
    assert len(res["routing"]) == 2 and "oracle agreement" in capsys.readouterr().out
