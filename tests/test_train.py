"""Training: PA labels, losses, router gradients, resume, multi-process, divergence, bad input."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, token_batch

from factorllm import FactorConfig, convert_, set_routing_
from factorllm.losses import PSEUDO_LABELS, pa_loss
from factorllm.train import (
    TeacherLogits,
    TrainConfig,
    TrainData,
    TrainingDiverged,
    pa_labels,
    routing_targets,
    train,
)


def _pair(cfg=None, family="llama"):
    cfg = cfg or FactorConfig(4, 2, gating="softmax_renorm")
    dense = tiny_model(family)
    return convert_(copy.deepcopy(dense), cfg, progress=False), dense


def _windows(n=8, s=16, seed=0):
    return token_batch(n, s, seed=seed)


def test_pa_labels_come_from_each_layers_real_input():
    student, dense = _pair()
    ids = _windows(2)
    got = routing_targets(student, dense, ids, "factorllm")[1]
    # The real input of layer 1's FFN, captured with a hook:
    seen = []
    h = student.model.layers[1].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        student(input_ids=ids)
    h.remove()
    want = pa_labels(student.model.layers[1].mlp, dense.model.layers[1].mlp, seen[0], "factorllm")
    assert torch.equal(got, want)
    # The reference code's bug: layer 1's labels built on layer 0's FFN output instead.
    seen0 = []
    h = dense.model.layers[0].mlp.register_forward_hook(lambda m, a, o: seen0.append(o.reshape(-1, 32)))
    with torch.no_grad():
        dense(input_ids=ids)
    h.remove()
    buggy = pa_labels(student.model.layers[1].mlp, dense.model.layers[1].mlp, seen0[0], "factorllm")
    assert not torch.equal(got, buggy)


def test_with_dense_layers_each_block_is_paired_with_its_own_layers_teacher_ffn():
    student, dense = _pair(FactorConfig(4, 2, gating="softmax_renorm", dense_layers=(0,)))
    ids = _windows(2)
    (got,) = routing_targets(student, dense, ids, "factorllm")
    seen = []
    h = student.model.layers[1].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        student(input_ids=ids)
    h.remove()
    block = student.model.layers[1].mlp
    assert torch.equal(got, pa_labels(block, dense.model.layers[1].mlp, seen[0], "factorllm"))
    assert not torch.equal(got, pa_labels(block, dense.model.layers[0].mlp, seen[0], "factorllm"))  # by position
    # Both modes train the one block and leave the dense layer as it was.
    layer0 = copy.deepcopy(student.model.layers[0].mlp.state_dict())
    before = _trained_state(student)
    for cfg in (TrainConfig(max_steps=3, token_batch=32, layerwise_tokens=64, train_experts=True, recon_weight=1.0,
                            save_every=0),
                TrainConfig(mode="end2end", train_experts=True, distill_weight=1.0, pa_weight=0.1, max_steps=2,
                            batch_size=2, save_every=0)):
        res = train(student, dense, TrainData(_windows(4)), cfg, progress=False)
        assert {r["stage"] for r in res.history} == {"layer 1" if cfg.mode == "layerwise" else "end2end"}
    after = _trained_state(student)
    moved = [n for n in after if n.endswith(("router.net.weight", "experts.w_in"))]
    assert len(moved) == 2 and all(not torch.equal(before[n], after[n]) for n in moved)
    assert all(torch.equal(v, student.model.layers[0].mlp.state_dict()[k]) for k, v in layer0.items())


def test_pa_loss_of_batch_four_is_mean_of_four_single_losses():
    student, dense = _pair()
    ids = _windows(4)
    labels = routing_targets(student, dense, ids, "norm")[0].view(4, 16, 4)
    logits = torch.randn(4, 16, 4)
    whole = pa_loss(logits, labels)
    singles = torch.stack([pa_loss(logits[i], labels[i]) for i in range(4)])
    torch.testing.assert_close(whole, singles.mean())
    # and the labels of the batch are the labels of its sequences, each computed alone
    alone = torch.cat([routing_targets(student, dense, ids[i : i + 1], "norm")[0] for i in range(4)])
    assert torch.equal(labels.view(-1, 4), alone)


@pytest.mark.parametrize("method", PSEUDO_LABELS.names())
def test_pseudo_labels_choose_k_experts(method):
    outs, y = torch.randn(10, 6, 8), torch.randn(10, 8)
    labels = PSEUDO_LABELS.get(method)(outs, y, 2)
    assert labels.shape == (10, 6) and torch.all(labels.sum(-1) == 2)


def test_lstsq_labels_pick_the_exact_pair():
    outs = torch.randn(5, 6, 8)
    y = outs[:, 1] + outs[:, 4]
    assert torch.all(PSEUDO_LABELS.get("lstsq")(outs, y, 2).nonzero()[:, 1].view(5, 2) == torch.tensor([1, 4]))


def _router_grad(gating, loss_name, straight_through=False):
    student, dense = _pair(FactorConfig(4, 2, gating=gating))
    block = student.model.layers[1].mlp
    block.router.straight_through = straight_through
    ids = _windows(2)
    student.zero_grad()
    if loss_name == "pa":
        labels = routing_targets(student, dense, ids, "norm")[1]
        x = torch.randn(32, 32)
        pa_loss(block.router(x).logits, labels[:32]).backward()
    else:
        from factorllm.losses import lm_loss

        lm_loss(student(input_ids=ids).logits, ids).backward()
    g = block.router.net.weight.grad
    return 0.0 if g is None else g.abs().sum().item()


@pytest.mark.parametrize("gating", ["hard", "softmax", "softmax_renorm"])
def test_router_gets_gradient_from_pa_loss_under_every_gating(gating):
    assert _router_grad(gating, "pa") > 0


@pytest.mark.parametrize("gating", ["softmax", "softmax_renorm"])
def test_router_gets_gradient_from_lm_loss_under_softmax_gatings(gating):
    assert _router_grad(gating, "lm") > 0


def test_hard_gating_passes_lm_gradient_only_with_straight_through():
    assert _router_grad("hard", "lm") == 0.0
    assert _router_grad("hard", "lm", straight_through=True) > 0


def _trained_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".router." in n or ".experts." in n}


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("mode,extra", [
    ("end2end", dict(train_experts=True, distill_weight=1.0, pa_weight=0.1, switch_weight=0.01)),
    ("layerwise", dict(train_experts=True, recon_weight=1.0, token_batch=64, layerwise_tokens=128)),
])
def test_killed_and_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, mode, extra):
    data = TrainData(_windows(8))
    cfg = TrainConfig(mode=mode, max_steps=5, save_every=2, lr=1e-2, batch_size=2, seed=3, **extra)
    a, dense = _pair()
    train(a, dense, data, dataclass_replace(cfg, output_dir=str(tmp_path / "a")), progress=False)

    b, _ = _pair()
    kill_at = 3 if mode == "end2end" else 8  # layerwise: step 3 of layer 1 (5 steps a layer)
    seen = []

    def killer(step, row):
        seen.append(row)
        if len(seen) == kill_at:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(b, dense, data, dataclass_replace(cfg, output_dir=str(tmp_path / "b")), callbacks=[killer],
              progress=False)
    c, _ = _pair()  # a fresh process would start from the converted model again
    train(c, dense, data, dataclass_replace(cfg, output_dir=str(tmp_path / "b"), resume=True), progress=False)
    want, got = _trained_state(a), _trained_state(c)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-6, msg=name)
    assert not torch.equal(want["model.layers.1.mlp.router.net.weight"],
                           _trained_state(_pair()[0])["model.layers.1.mlp.router.net.weight"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_teacher_logits_equal_the_teachers_and_skip_its_body_on_a_second_visit(family):
    teacher = tiny_model(family)
    ids = _windows(3)
    body_calls = []
    teacher.base_model.register_forward_hook(lambda m, a, o: body_calls.append(1))
    cached = TeacherLogits(teacher, cache=True)
    want = teacher(input_ids=ids).logits
    torch.testing.assert_close(cached(torch.tensor([4, 7, 9]), ids), want, atol=1e-5, rtol=1e-5)
    body_calls.clear()
    again = cached(torch.tensor([9, 4]), ids[[2, 0]])  # both windows seen: the output head only
    assert body_calls == []
    torch.testing.assert_close(again, want[[2, 0]], atol=1e-5, rtol=1e-5)


def test_teacher_cache_steps_aside_for_a_model_whose_logits_are_not_its_heads_output():
    teacher = tiny_model("llama")

    def scale(_m, _a, out):  # a model that scales its logits after the head (as Cohere and Gemma 2 do)
        out.logits = out.logits * 3.0
        return out

    teacher.register_forward_hook(scale)
    ids = _windows(2)
    cached = TeacherLogits(teacher, cache=True)
    torch.testing.assert_close(cached(torch.tensor([0, 1]), ids), teacher(input_ids=ids).logits)
    assert cached.hidden is None  # fell back to full forwards


def test_end_to_end_distillation_with_the_teacher_cache_trains_as_without_it():
    data = TrainData(_windows(4))
    cfg = TrainConfig(mode="end2end", train_experts=True, distill_weight=1.0, pa_weight=0.1, max_steps=6,
                      batch_size=2, lr=1e-2, save_every=0)  # 6 steps of 2 over 4 windows: each seen 3 times
    states = []
    for cache in (True, False):
        student, dense = _pair()
        train(student, dense, data, dataclass_replace(cfg, cache_teacher=cache), progress=False)
        states.append(_trained_state(student))
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], atol=1e-5, rtol=1e-5, msg=name)
    assert not torch.equal(states[0]["model.layers.0.mlp.router.net.weight"],
                           _trained_state(_pair()[0])["model.layers.0.mlp.router.net.weight"])


def test_router_lr_sets_the_routers_rate_apart_from_the_experts():
    """lr=0-ish for the experts, a real rate for the routers: only the routers move (and the reverse)."""
    data = TrainData(_windows(4))
    cfg = TrainConfig(mode="end2end", train_experts=True, distill_weight=1.0, pa_weight=0.1, max_steps=3,
                      batch_size=2, save_every=0)
    start = _trained_state(_pair()[0])
    for lr, router_lr, moved in ((1e-12, 1e-2, ".router."), (1e-2, 1e-12, ".experts.")):
        student, dense = _pair()
        train(student, dense, data, dataclass_replace(cfg, lr=lr, router_lr=router_lr), progress=False)
        end = _trained_state(student)
        for name in end:
            change = (end[name] - start[name]).abs().max().item()
            assert (change > 1e-4) == (moved in name), (name, change)


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    student, dense = _pair()
    cfg = TrainConfig(mode="end2end", max_steps=6, save_every=1, batch_size=2, output_dir=str(tmp_path))

    def poison(step, row):
        if step == 2:
            with torch.no_grad():
                student.model.layers[0].mlp.router.net.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 2; the last good checkpoint is kept.*lr="):
        train(student, dense, TrainData(_windows(4)), cfg, callbacks=[poison], progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["params"].values())


def test_training_lowers_the_pa_loss():
    student, dense = _pair(FactorConfig(8, 2, gating="softmax_renorm"))
    res = train(student, dense, TrainData(_windows(8)), TrainConfig(max_steps=60, lr=3e-2, token_batch=128),
                progress=False)
    layer0 = [r["loss"] for r in res.history if r["stage"] == "layer 0"]
    assert layer0[-1] < 0.7 * layer0[0]


def test_bad_input_gets_clear_errors(tmp_path):
    student, dense = _pair()
    with pytest.raises(ValueError, match="training data must be windows"):
        TrainData(torch.empty(0, 16, dtype=torch.long))
    from factorllm.data import pack

    with pytest.raises(ValueError, match="fewer than one window"):
        pack(torch.arange(10), 16)
    with pytest.raises(ValueError, match="longer than the model's context"):
        train(student, dense, TrainData(token_batch(2, 200)), TrainConfig(), progress=False)
    with pytest.raises(ValueError, match="teacher does not match the student: num_hidden_layers"):
        import transformers as tf

        other = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3,
                                                                   num_attention_heads=4, intermediate_size=64))
        train(student, other, TrainData(_windows(2)), TrainConfig(), progress=False)
    with pytest.raises(ValueError, match="teacher must be the dense model"):
        train(student, student, TrainData(_windows(2)), TrainConfig(), progress=False)
    # a checkpoint written by another config
    cfg = TrainConfig(max_steps=2, save_every=1, token_batch=32, layerwise_tokens=64, output_dir=str(tmp_path))
    train(student, dense, TrainData(_windows(4)), cfg, progress=False)
    with pytest.raises(ValueError, match="different training config"):
        train(student, dense, TrainData(_windows(4)), dataclass_replace(cfg, lr=0.5, resume=True), progress=False)
    with pytest.raises(ValueError, match="oracle gating has no router"):
        train(set_routing_(_pair()[0], gating="oracle"), dense, TrainData(_windows(2)), TrainConfig(), progress=False)


@pytest.mark.parametrize("kw,msg", [
    (dict(mode="joint"), "mode="), (dict(train_router=False), "nothing to train"),
    (dict(mode="layerwise", lm_weight=1.0), "need mode='end2end'"), (dict(pa_weight=0.0), "train_router needs"),
    (dict(train_experts=True, train_router=False), "train_experts needs"), (dict(resume=True), "resume needs"),
    (dict(pseudo_label="best"), "unknown pseudo-label"), (dict(router_lr=0.0), "learning rates must be > 0"),
])
def test_train_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw)


DDP_SCRIPT = Path(__file__).with_name("ddp_train_script.py")


def test_two_processes_give_the_same_loss_curve_as_one(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one.json"
    two = tmp_path / "two.json"
    subprocess.run([sys.executable, str(DDP_SCRIPT), str(one)], check=True, env=env, timeout=300)
    # NOTE: `--cpu` alone starts one process; the torchrun launcher starts two, which form a gloo group on CPU.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(DDP_SCRIPT), str(two)]
    subprocess.run(launch, check=True, env=env, timeout=300)
    ra, rb = json.loads(one.read_text()), json.loads(two.read_text())
    assert (ra["processes"], rb["processes"]) == (1, 2)
    a, b = ra["losses"], rb["losses"]
    assert len(a) == len(b) == 6
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-5)
    assert a[-1] < a[0]


@pytest.mark.parametrize("mode,extra", [
    ("end2end", dict(train_experts=True, distill_weight=1.0)),
    ("layerwise", dict(token_batch=64, layerwise_tokens=128)),
])
def test_progress_false_shows_no_bars(mode, extra, capsys):
    student, dense = _pair()
    cfg = TrainConfig(mode=mode, max_steps=3, batch_size=2, save_every=0, **extra)
    train(student, dense, TrainData(_windows(4)), cfg, progress=False)
    err = capsys.readouterr().err
    assert "it/s" not in err and "s/it" not in err
    train(student, dense, TrainData(_windows(4)), cfg, progress=True)
    assert "it/s" in capsys.readouterr().err  # the bars do show when asked for
