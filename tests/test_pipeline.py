"""`factorllm run` on a tiny model: report written from results.json, and an interrupted run resumes."""

from __future__ import annotations

import json

import pytest

import factorllm.evaluate
from factorllm.pipeline import RunConfig, run


def _cfg(folder):
    return RunConfig(model=str(folder), experts=4, top_ks=(1, 2), partition="importance", gating="sum",
                     calib_tokens=128, train_tokens=256, router_steps=3, expert_steps=2, eval_windows=2, cloze=4,
                     task_limit=3, bench_repeats=1, decode_tokens=2, window=64)


def test_run_writes_report_matching_results_and_resumes(tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = factorllm.evaluate.evaluate_model
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # dense eval, e4_k1 eval, then the oracle eval dies
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(factorllm.evaluate, "evaluate_model", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(tiny_folder), out, log=lambda s: None)
    assert (out / "eval_dense.json").exists() and (out / "e4_k1_eval.json").exists()
    before = (out / "e4_k1_train.json").read_text()

    log = []
    monkeypatch.setattr(factorllm.evaluate, "evaluate_model", real)
    results = run(_cfg(tiny_folder), out, log=log.append)
    assert "[done] eval_dense" in log and "[done] e4_k1_train" in log and "[run ] e4_k1_eval_oracle" in log
    assert (out / "e4_k1_train.json").read_text() == before  # not trained again

    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    report = (out / "report.md").read_text()
    for c in saved["configs"]:
        assert c["ffn_compute_fraction"] == c["top_k"] / 4
        for v in c["ppl"].values():
            assert f"{v:.2f}" in report
        assert f"{c['decode_speedup']:.2f}x" in report
        assert set(c) >= {"experts", "top_k", "partition", "ffn_compute_fraction", "ppl", "accuracy",
                          "decode_speedup", "prefill_speedup"}
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "load.png").stat().st_size > 1000


def test_run_refuses_a_folder_with_another_configuration(tiny_folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"experts": 99}))
    with pytest.raises(ValueError, match="another configuration"):
        run(_cfg(tiny_folder), out, log=lambda s: None)
