"""Zero-shot tasks: small fixtures in the real PIQA, HellaSwag, ARC, BoolQ and WinoGrande schemas (written for
this project: no benchmark data ships here), a cloze task cut from held-out text, and two scorers.

- `harness_accuracy`: lm-evaluation-harness with the model object (`HFLM(pretrained=model)` and
  `simple_evaluate`), so a user with the real data sets runs any harness task the same way.
- `loglikelihood_accuracy`: the project's own scorer, the same prompts and the same context/continuation split
  as the harness (tested to give the same accuracy).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

FIXTURES = Path(__file__).parent


@dataclass(frozen=True)
class TaskSpec:
    """A multiple-choice task: Jinja templates over a JSONL document, as lm-evaluation-harness writes them."""

    name: str
    file: str
    doc_to_text: str
    doc_to_choice: str
    doc_to_target: str

    @property
    def path(self) -> Path:
        return FIXTURES / self.file

    def docs(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def harness_config(self) -> dict:
        return {
            "task": f"factorllm_{self.name}", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(self.path)}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": self.doc_to_text, "doc_to_choice": self.doc_to_choice,
            "doc_to_target": self.doc_to_target, "target_delimiter": " ",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }


TASKS = {t.name: t for t in (
    TaskSpec("piqa", "piqa.jsonl", "Question: {{goal}}\nAnswer:", "{{[sol1, sol2]}}", "{{label}}"),
    TaskSpec("hellaswag", "hellaswag.jsonl", "{{ctx}}", "{{endings}}", "{{label}}"),
    TaskSpec("arc_easy", "arc_easy.jsonl", "Question: {{question}}\nAnswer:", "{{choices.text}}",
             "{{choices.label.index(answerKey)}}"),
    TaskSpec("boolq", "boolq.jsonl", "{{passage}}\nQuestion: {{question}}?\nAnswer:", "{{['no', 'yes']}}",
             "{{label}}"),
    TaskSpec("winogrande", "winogrande.jsonl", "Fill in the blank: {{sentence}}\nAnswer:", "{{[option1, option2]}}",
             "{{answer | int - 1}}"),
)}


def _render(template: str, doc: dict) -> str:
    import jinja2

    return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(template).render(**doc)


def _choices(spec: TaskSpec, doc: dict) -> list[str]:
    import ast

    return list(ast.literal_eval(_render(spec.doc_to_choice, doc)))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split: trailing spaces of the context move to the continuation; the continuation's tokens
    are those of context+continuation after the context's own tokens."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


@torch.no_grad()
def continuation_logprob(model: nn.Module, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Sum of log-probabilities of `cont` after `ctx`, and whether greedy decoding would produce it."""
    ids = torch.tensor([ctx + cont])
    logp = model(input_ids=ids[:, :-1], use_cache=False).logits[0, len(ctx) - 1:].float().log_softmax(-1)  # [C, V]
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool(torch.equal(logp.argmax(-1), target))


def loglikelihood_accuracy(model: nn.Module, tokenizer, name: str, limit: int | None = None) -> float:
    """Accuracy of the choice with the highest summed log-likelihood (the harness's `acc`)."""
    spec = TASKS[name]
    docs = spec.docs()[:limit]
    correct = 0
    for doc in tqdm(docs, desc=f"task {name}", leave=False):
        context = _render(spec.doc_to_text, doc)
        pairs = [encode_pair(tokenizer, context, " " + c) for c in _choices(spec, doc)]
        scores = [continuation_logprob(model, *pair)[0] for pair in pairs]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == int(_render(spec.doc_to_target, doc)))
    return correct / len(docs)


def harness_accuracy(model: nn.Module, tokenizer, names: list[str], limit: int | None = None,
                     batch_size: int = 1) -> dict[str, float]:
    """Accuracy of each fixture task through lm-evaluation-harness (pip install factorllm[eval])."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the harness path needs lm-evaluation-harness: pip install 'factorllm[eval]'") from err
    unknown = set(names) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {sorted(TASKS)}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=[TASKS[n].harness_config() for n in names], num_fewshot=0, limit=limit,
                          task_manager=TaskManager(), log_samples=False, bootstrap_iters=0)
    return {n: float(out["results"][f"factorllm_{n}"]["acc,none"]) for n in names}


def cloze_items(text: str, count: int, min_words: int = 12, seed: int = 0) -> list[tuple[str, str]]:
    """LAMBADA-style items from held-out text: (passage without its last word, the last word), one per line or
    paragraph of at least `min_words` words, `count` of them picked at random."""
    units = [u.strip() for u in re.split(r"\n\s*\n|\n", text) if len(u.split()) >= min_words]
    g = torch.Generator().manual_seed(seed)
    picked = [units[i] for i in torch.randperm(len(units), generator=g)[:count].tolist()]
    items = []
    for u in picked:
        words = u.split()
        last = re.sub(r"\W+$", "", words[-1])
        if last:
            items.append((" ".join(words[:-1]), last))
    return items


def cloze_accuracy(model: nn.Module, tokenizer, items: list[tuple[str, str]]) -> float:
    """Share of items whose last word greedy decoding reproduces exactly (LAMBADA's accuracy)."""
    hits = [continuation_logprob(model, *encode_pair(tokenizer, ctx, " " + word))[1]
            for ctx, word in tqdm(items, desc="cloze", leave=False)]
    return sum(hits) / len(hits)
