"""benchmarks/train_quality.py's plumbing on a tiny model: its three stages and its JSON rows (not its numbers)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "train_quality.py"


def _train_text(tmp_path: Path) -> Path:
    """A small training text file (the scripts' --train-data)."""
    text = tmp_path / "train.txt"
    text.write_text("In the beginning was the word, and the word was with code.\n" * 200, encoding="utf-8")
    return text


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_train_quality_writes_one_row_per_stage_with_the_issues_keys(tiny_folder, tmp_path):
    text = _train_text(tmp_path)
    out = tmp_path / "rows.json"
    # The defaults' block (128 experts, 256 shared neurons, layer 0 dense) does not fit a 2-layer model of 64
    # neurons: a smaller one, every layer factorized.
    proc = _run("--model", str(tiny_folder), "--experts", "8", "--shared-neurons", "16", "--dense-layers",
                "--fractions", "0.5", "--minutes", "0.05", "--window", "32", "--train-tokens", "256",
                "--eval-windows", "1", "--train-data", str(text), "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["stage"] for r in rows] == ["router", "router+experts", "router+experts, end2end"]
    for r in rows:
        assert (r["experts"], r["top_k"], r["partition"], r["dense_layers"]) == (8, 2, "importance", [])
        assert r["ffn_compute"] == 0.4375  # (16 shared + 2 experts of 6) / 64
        assert r["steps"] >= 1 and r["train_minutes"] > 0
        for domain in ("pydoc", "kjv"):
            assert set(r["ppl"][domain]) == {"dense", "trained", "oracle", "random"}
            assert all(math.isfinite(v) and v > 1 for v in r["ppl"][domain].values())
    assert proc.stdout.count("| 44% | router") == 3  # the printed table, a row per stage
    # the end-to-end stage runs for what the layer-wise stages left of the 3 seconds, the clock read after each
    # step: with nothing left (as here, on this machine) exactly one step, however slow a loaded machine makes it
    left_s = max(0.0, 3.0 - 60 * (rows[0]["train_minutes"] + rows[1]["train_minutes"]))
    if left_s == 0:
        assert rows[2]["steps"] == 1
    else:
        assert 60 * rows[2]["train_minutes"] <= left_s + 1.0


def test_train_quality_records_the_curve_of_its_end_to_end_stage(tiny_folder, tmp_path):
    text = _train_text(tmp_path)
    out = tmp_path / "rows.json"
    proc = _run("--model", str(tiny_folder), "--experts", "8", "--shared-neurons", "16", "--dense-layers",
                "--fractions", "0.5", "--minutes", "0.5", "--e2e-share", "0.9", "--curve-minutes", "0.01",
                "--window", "32", "--train-tokens", "256", "--eval-windows", "1", "--train-data", str(text),
                "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [("curve" in r) for r in rows] == [False, False, True]  # the end-to-end stage's alone
    curve, e2e = rows[2]["curve"], rows[2]
    assert len(curve) >= 1 and proc.stderr.count("curve top-2/8:") == len(curve)
    before = 60 * (rows[0]["train_minutes"] + rows[1]["train_minutes"])  # the clock starts at the stages before
    marks = [int(p["minutes"] / 0.01) for p in curve]
    assert marks[0] >= max(1, int(before / 0.6)) and all(a < b for a, b in zip(marks, marks[1:], strict=False))
    assert curve[-1]["minutes"] <= rows[0]["train_minutes"] + rows[1]["train_minutes"] + e2e["train_minutes"]
    assert [p["steps"] for p in curve] == sorted(p["steps"] for p in curve) and curve[-1]["steps"] <= e2e["steps"]
    for p in curve:
        assert set(p["ppl"]) == {"pydoc", "kjv"} and all(math.isfinite(v) and v > 1 for v in p["ppl"].values())
    proc = _run("--model", str(tiny_folder), "--curve-minutes", "-1")
    assert proc.returncode == 2 and "--curve-minutes >= 0" in proc.stderr


def test_train_quality_refuses_a_budget_it_cannot_keep(tiny_folder):
    proc = _run("--model", str(tiny_folder), "--e2e-share", "1.0")
    assert proc.returncode == 2 and "--e2e-share in [0, 1)" in proc.stderr
    # Layer 0 dense is half of a 2-layer model's FFN compute: nothing is left for the other layer at 50%.
    proc = _run("--model", str(tiny_folder), "--experts", "8", "--shared-neurons", "16", "--fractions", "0.5")
    assert proc.returncode == 1
    assert "at 50% of the FFN compute this block needs 67.2% with k = 1" in proc.stderr
    assert "lower --shared-neurons, keep fewer --dense-layers" in proc.stderr


SPARSITY_SCRIPT = Path(__file__).parents[1] / "benchmarks" / "activation_sparsity.py"


def test_activation_sparsity_writes_a_row_per_stage_at_the_fraction(tiny_folder, tmp_path):
    text = _train_text(tmp_path)
    out = tmp_path / "rows.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SPARSITY_SCRIPT), "--model", str(tiny_folder), "--fractions", "0.5",
                           "--minutes", "0.05", "--layerwise-steps", "2", "--window", "32", "--train-tokens", "256",
                           "--eval-windows", "1", "--train-data", str(text), "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["stage"] for r in rows] == ["training-free", "layer-wise", "end2end"]
    for r in rows:
        assert math.isclose(r["ffn_compute"], 0.5)
        assert math.isclose((2 * r["input_keep"] + r["neuron_keep"]) / 3, 0.5)
        for domain in ("pydoc", "kjv"):
            assert set(r["ppl"][domain]) == {"dense", "trained", "oracle"}
            assert all(math.isfinite(v) and v > 1 for v in r["ppl"][domain].values())
    assert [r["steps"] for r in rows[:2]] == [0, 2] and rows[2]["steps"] >= 1


def test_activation_sparsity_records_the_curve_of_its_end_to_end_stage(tiny_folder, tmp_path):
    text = _train_text(tmp_path)
    out = tmp_path / "rows.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, str(SPARSITY_SCRIPT), "--model", str(tiny_folder), "--fractions", "0.5", "--window", "32",
           "--train-tokens", "256", "--eval-windows", "1", "--train-data", str(text), "--input-keep", "0.6"]
    proc = subprocess.run([*run, "--minutes", "0.1", "--curve-minutes", "0.002", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    free, e2e = json.loads(out.read_text())
    assert "curve" not in free and e2e["stage"] == "end2end"
    curve = e2e["curve"]  # a point each 0.12 s of training, none at or past the end
    assert len(curve) >= 1 and len(proc.stderr.split("curve 50%:")) == len(curve) + 1
    minutes = [p["minutes"] for p in curve]
    marks = [int(m / 0.002) for m in minutes]  # each point the first past its multiple of 0.002
    assert marks[0] >= 1 and all(a < b for a, b in zip(marks, marks[1:], strict=False))
    assert minutes[-1] <= e2e["train_minutes"]  # evaluation time is not training time
    steps = [p["steps"] for p in curve]
    assert steps == sorted(steps) and 1 <= steps[0] and steps[-1] <= e2e["steps"]
    for p in curve:
        assert set(p["ppl"]) == {"pydoc", "kjv"} and all(math.isfinite(v) and v > 1 for v in p["ppl"].values())
    proc = subprocess.run([*run, "--curve-minutes", "-1"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2 and "--curve-minutes must be >= 0, got -1" in proc.stderr


def test_activation_sparsity_fits_trains_along_and_refits_a_learned_chooser(tiny_folder, tmp_path):
    text = _train_text(tmp_path)
    out = tmp_path / "rows.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, str(SPARSITY_SCRIPT), "--model", str(tiny_folder), "--fractions", "0.5", "--minutes",
           "0.05", "--window", "32", "--train-tokens", "256", "--eval-windows", "1", "--train-data", str(text)]
    proc = subprocess.run([*run, "--exact-neurons", "--chooser-steps", "2", "--chooser-tokens", "128",
                           "--chooser-weight", "1", "--chooser-refit", "--input-keep", "0.3", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["stage"] for r in rows] == ["training-free", "chooser", "end2end", "chooser refit"]
    assert [r["steps"] for r in rows[:2]] == [0, 2] and rows[2]["steps"] >= 1 and rows[3]["steps"] == 2
    assert all(r["chooser_steps"] == 2 and r["chooser_weight"] == 1 and r["exact_neurons"] for r in rows)
    assert all(r["input_keep"] == 0.3 and r["neuron_keep"] == pytest.approx(0.3) for r in rows)  # given, not searched
    assert "input_keep given: 0.3" in proc.stderr + proc.stdout
    assert "chooser recall of the exact neurons" in proc.stderr + proc.stdout
    for bad, message in ((["--chooser-steps", "2"], "--chooser-steps needs --exact-neurons"),
                         (["--exact-neurons", "--chooser-refit"], "--chooser-refit and --chooser-weight need"),
                         (["--exact-neurons", "--chooser-weight", "1"], "--chooser-refit and --chooser-weight need")):
        proc = subprocess.run([*run, *bad], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 2 and message in proc.stderr


def test_activation_sparsity_refuses_a_fraction_it_cannot_reach(tiny_folder):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = lambda *a: subprocess.run([sys.executable, str(SPARSITY_SCRIPT), "--model", str(tiny_folder), *a],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=600)
    proc = run("--fractions", "1.5")
    assert proc.returncode == 2 and "--fractions in (0, 1]" in proc.stderr
    proc = run("--fractions", "0.04", "--eval-windows", "1", "--window", "32", "--train-tokens", "256")
    assert proc.returncode == 1 and "at 4% of the FFN compute no input share on the grid" in proc.stderr
    proc = run("--fractions", "0.5", "--input-keep", "0.9", "--eval-windows", "1", "--window", "32",
               "--train-tokens", "256")  # 2/3 of the FFN on the input pass alone: more than half
    assert proc.returncode == 1 and "input_keep=0.9 leaves neuron_keep" in proc.stderr and "--input-keep" in proc.stderr


SPEED_SCRIPT = Path(__file__).parents[1] / "benchmarks" / "sparse_speed.py"


def test_sparse_speed_times_the_layer_and_the_whole_model(tiny_folder, tmp_path):
    from factorllm import native

    out = tmp_path / "speed.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SPEED_SCRIPT), "--model", str(tiny_folder), "--shapes", "32x64",
                           "--tokens", "1,4,512", "--repeats", "2", "--model-repeats", "1", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [(r["hidden"], r["ffn"], r["tokens"]) for r in res["layers"]] == [(32, 64, 1), (32, 64, 4), (32, 64, 512)]
    want_path = "native" if native.available() else "masked"
    assert [r["path"] for r in res["layers"]] == [want_path, want_path, "masked"]
    assert all(r["sparse_ratio"] > 0 and abs(r["ideal_ratio"] - 0.5) < 1e-9 for r in res["layers"])
    assert res["model"]["decode_speedup"] > 0 and "whole model" in proc.stdout
    assert res["model_dense_prefill"]["prefill_speedup"] > 0 and "inside dense_prefill" in proc.stdout
    bad = subprocess.run([sys.executable, str(SPEED_SCRIPT), "--shapes", "576"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert bad.returncode == 2 and "--shapes takes hidden x ffn pairs" in bad.stderr
