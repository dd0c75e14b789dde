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
    if window < 2:
        raise ValueError(f"window={window} must be >= 2")
    if token_ids.numel() < window:
        raise ValueError(f"{token_ids.numel()} tokens are fewer than one window of {window}; give more text")
    device = next(model.parameters()).device
    wins = token_ids[: token_ids.numel() // window * window].view(-1, window)  # [W, window]
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
