"""Quality metrics, as pure functions of a model and token ids."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: nn.Module, token_ids: torch.Tensor, window: int = 512, batch_size: int = 4, progress: bool = False
) -> float:
    """Perplexity over fixed, non-overlapping windows.

    Convention: the ids [N] are cut into floor(N / window) windows of `window` tokens (the remainder is
    dropped); each window is scored on its own, from an empty context, so each predicts its `window - 1` last
    tokens. ppl = exp(total negative log-likelihood / total predicted tokens). No sliding-window context, so
    numbers are comparable between models only at the same window.

    Example:
        >>> perplexity(model, tokenize(tok, pydoc_text()), window=512)
    """
    token_ids = token_ids.reshape(-1)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and window > max_pos:
        raise ValueError(f"window={window} is longer than the model's context ({max_pos}); use window <= {max_pos}")
    from factorllm.data import pack

    wins = pack(token_ids, window)  # [W, window]; too few tokens or window < 2 is a clear error there
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(wins.split(batch_size), desc="perplexity", disable=not progress):
            batch = batch.to(device)  # [b, window]
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # [b, window-1, V]
            nll += nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(nll / count)


DOMAINS = ("pydoc", "kjv")


def evaluate_model(model: nn.Module, tokenizer, window: int = 512, eval_windows: int = 8, cloze: int = 64,
                   tasks: list[str] | None = None, task_limit: int | None = None, scorer: str = "own",
                   progress: bool = True) -> dict:
    """Everything `factorllm eval` reports, as one dict.

    Keys: `ppl` (per domain: Python docs, held-out KJV books), `cloze` (LAMBADA-style last-word accuracy per
    domain), `accuracy` (per fixture task; `scorer` is `own` or `harness`), and for factorized models
    `routing` (per-layer statistics on the Python docs).
    """
    from factorllm.data import kjv_text, pydoc_text, tokenize, windows
    from factorllm.metrics import routing_stats
    from factorllm.moe import moe_layers
    from factorllm.tasks import TASKS, cloze_accuracy, cloze_items, harness_accuracy, loglikelihood_accuracy

    if scorer not in ("own", "harness"):
        raise ValueError(f"scorer={scorer!r}; use 'own' or 'harness'")
    tasks = sorted(TASKS) if tasks is None else tasks
    texts = {"pydoc": pydoc_text(), "kjv": kjv_text("heldout")}
    ids = {d: windows(tokenize(tokenizer, t), window, eval_windows, seed=0) for d, t in texts.items()}
    out: dict = {"ppl": {}, "cloze": {}, "accuracy": {}}
    for d in DOMAINS:
        out["ppl"][d] = perplexity(model, ids[d].reshape(-1), window=window, progress=progress)
        if cloze:
            out["cloze"][d] = cloze_accuracy(model, tokenizer, cloze_items(texts[d], cloze, seed=0))
    if tasks:
        out["accuracy"] = harness_accuracy(model, tokenizer, tasks, limit=task_limit) if scorer == "harness" else \
            {t: loglikelihood_accuracy(model, tokenizer, t, limit=task_limit) for t in tasks}
    if moe_layers(model):
        out["routing"] = routing_stats(model, ids["pydoc"][:2])
    return out
