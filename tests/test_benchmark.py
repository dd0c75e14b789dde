"""The benchmark's plumbing (not its speed: speed is measured by `factorllm bench`, never asserted in tests)."""

from __future__ import annotations

import json

import pytest
import torch

from factorllm.benchmark import BenchConfig, bench_ffn, mixtral_peer, time_interleaved
from factorllm.cli.main import main
from factorllm.moe import MoEFeedForward


def test_mixtral_peer_computes_the_same_function_as_softmax_renorm_moe():
    from factorllm import FactorConfig
    from factorllm.benchmark import _dense_llama_ffn

    dense = _dense_llama_ffn(16, 32, torch.float32, "cpu")
    moe = MoEFeedForward.from_dense(dense, FactorConfig(4, 2, gating="softmax_renorm"),
                                    list(torch.arange(32).view(4, -1)))
    with torch.no_grad():
        moe.router.net.bias.zero_()  # Mixtral's router has no bias
        x = torch.randn(1, 5, 16)
        torch.testing.assert_close(mixtral_peer(moe)(x), moe(x), atol=1e-5, rtol=1e-5)


def test_bench_ffn_rows_and_json_keys(tmp_path, capsys):
    rows = bench_ffn(BenchConfig(shapes=((16, 32),), tokens=(1, 8), repeats=1, warmup=0, model=None))
    assert [(r.hidden, r.ffn, r.tokens) for r in rows] == [(16, 32, 1), (16, 32, 8)]
    assert all(r.ideal_ratio == 0.25 and r.dense_ms > 0 and r.moe_ms > 0 for r in rows)
    out = tmp_path / "b.json"
    assert main(["bench", "--model", "none", "--shapes", "16x32", "--tokens", "1", "--repeats", "1",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["ffn"][0]) >= {"hidden", "ffn", "tokens", "dense_ms", "moe_ms", "mixtral_ms", "ratio",
                                   "ideal_ratio"}
    assert data["conditions"]["threads"] >= 1 and "torch" in data["conditions"]
    assert "moe/dense" in capsys.readouterr().out


def test_time_interleaved_runs_each_function_in_turn():
    calls = []
    ms = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, 1, "cpu")
    assert calls == ["a", "b"] * 4 and set(ms) == {"a", "b"}


@pytest.mark.parametrize("kw,msg", [({"top_k": 9}, "top_k"), ({"dtype": "int8"}, "dtype"),
                                    ({"repeats": 0}, "repeats")])
def test_bench_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        BenchConfig(**kw)


def test_bench_cli_rejects_malformed_shapes(capsys):
    assert main(["bench", "--model", "none", "--shapes", "576by1536"]) == 2
    assert "HIDDENxFFN" in capsys.readouterr().err
