"""Tracing: what blocks see and give during a pass, and the activation cache built on it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, token_batch

from factorllm.adapters import find_ffns
from factorllm.tracing import collect, trace_inputs, trace_outputs


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_collect_keeps_each_blocks_real_inputs_and_outputs_over_batches(family):
    model = tiny_model(family).train()  # dropout is off in the tiny configs; eval mode is what collect runs in
    mlps = [m for _, m in find_ffns(model)]
    ids = token_batch(5, 8)
    xs, ys = collect(model, mlps, ids, batch_size=2, with_outputs=True)  # batches of 2, 2, 1
    assert model.training  # its mode is given back
    assert [x.shape for x in xs] == [torch.Size([40, 32])] * len(mlps)
    with torch.no_grad():
        for mlp, x, y in zip(mlps, xs, ys, strict=True):
            torch.testing.assert_close(mlp(x), y)
        # layer 1's input is not layer 0's output (the residual stream and attention lie between)
        assert not torch.allclose(xs[1], ys[0])
    inputs, none = collect(model, mlps[1:], ids, batch_size=5)
    torch.testing.assert_close(inputs[0], xs[1])
    assert none is None


def test_hooks_are_removed_on_exit_and_on_error():
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    with pytest.raises(RuntimeError, match="boom"), trace_inputs([mlp]) as seen, trace_outputs([mlp]):
        model(input_ids=token_batch(1, 4))
        assert seen[0].shape == (4, 32)
        raise RuntimeError("boom")
    assert not mlp._forward_pre_hooks and not mlp._forward_hooks
