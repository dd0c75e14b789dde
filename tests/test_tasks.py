"""Fixture tasks: the harness path and the project's own scorer agree."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from factorllm import FactorConfig, convert_
from factorllm.tasks import TASKS, cloze_accuracy, cloze_items, encode_pair, harness_accuracy, loglikelihood_accuracy


@pytest.mark.parametrize("name", sorted(TASKS))
def test_fixtures_are_well_formed(name):
    spec = TASKS[name]
    docs = spec.docs()
    assert len(docs) >= 24
    from factorllm.tasks import _choices, _render

    for doc in docs:
        choices = _choices(spec, doc)
        assert len(choices) >= 2 and 0 <= int(_render(spec.doc_to_target, doc)) < len(choices)
    targets = [int(_render(spec.doc_to_target, d)) for d in docs]
    assert len(set(targets)) > 1  # the right answer is not always in the same place


def test_encode_pair_moves_trailing_space_to_the_continuation():
    tok = tiny_tokenizer()
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ctx == ids("Answer:") and cont == ids(" yes")


def test_harness_accuracy_equals_own_scorer():
    names = sorted(TASKS)
    tok = tiny_tokenizer()
    model = convert_(tiny_model("llama", seed=1), FactorConfig(4, 2, gating="softmax_renorm"), progress=False)
    harness = harness_accuracy(model, tok, names, limit=10)
    ours = {n: loglikelihood_accuracy(model, tok, n, limit=10) for n in names}
    assert harness == pytest.approx(ours, abs=1e-9)


def test_cloze_items_and_accuracy_bounds():
    text = "\n".join(f"line {i} " + "word " * 12 + f"end{i}." for i in range(30))
    items = cloze_items(text, 10)
    assert len(items) == 10 and all(w.startswith("end") and not w.endswith(".") for _, w in items)
    acc = cloze_accuracy(tiny_model("llama"), tiny_tokenizer(), items)
    assert 0.0 <= acc <= 1.0


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown tasks"):
        harness_accuracy(torch.nn.Linear(1, 1), tiny_tokenizer(), ["mmlu"])
