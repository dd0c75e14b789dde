"""Forward hooks that record what blocks see and give during a pass, removed on exit; what they record is the
caller's (nothing is stashed in globals or on the modules). `collect` runs a model over token windows and keeps
it all: the cached activations of layer-wise training and of the chooser fit.

Legend: B windows, S tokens per window, T tokens, D hidden.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm


@contextmanager
def trace_inputs(blocks: Sequence[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Records each block's input in its last call of a forward pass, detached, as [T, D]; the list is in the
    blocks' order."""
    with _trace(blocks, outputs=False) as seen:
        yield seen


@contextmanager
def trace_outputs(blocks: Sequence[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """As `trace_inputs`, each block's output [T, D]."""
    with _trace(blocks, outputs=True) as seen:
        yield seen


@contextmanager
def _trace(blocks: Sequence[nn.Module], outputs: bool) -> Iterator[list[torch.Tensor]]:
    seen: list[torch.Tensor | None] = [None] * len(blocks)

    def record(i: int, t: torch.Tensor) -> None:
        seen[i] = t.detach().reshape(-1, t.shape[-1])  # [T, D]

    if outputs:
        handles = [b.register_forward_hook(lambda _m, _a, out, i=i: record(i, out)) for i, b in enumerate(blocks)]
    else:
        handles = [b.register_forward_pre_hook(lambda _m, args, i=i: record(i, args[0])) for i, b in enumerate(blocks)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect(model: nn.Module, blocks: Sequence[nn.Module], windows: torch.Tensor, batch_size: int = 4,
            with_outputs: bool = False, progress: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Runs `model` (in eval mode; its mode is restored) over token windows [B, S], `batch_size` at a time, and
    returns each block's inputs [B*S, D] and, with `with_outputs`, its outputs [B*S, D], in the blocks' order.
    Holds them all at once: blocks x B x S x D floats each (SmolLM2, 30 layers at 16k tokens: 1.1 GB)."""
    traced = list(blocks) if with_outputs else []  # the blocks whose outputs are kept
    xs: list[list[torch.Tensor]] = [[] for _ in blocks]  # per block: [b*S, D] a batch
    ys: list[list[torch.Tensor]] = [[] for _ in traced]
    was_training = model.training
    try:
        model.eval()
        for batch in tqdm(windows.split(batch_size), desc="caching activations", disable=not progress, leave=False):
            with trace_inputs(blocks) as x_seen, trace_outputs(traced) as y_seen:
                model(input_ids=batch, use_cache=False)
            for acc, t in zip(xs + ys, x_seen + y_seen, strict=True):
                acc.append(t)
    finally:
        model.train(was_training)
    return _join(xs), (_join(ys) if with_outputs else None)


def _join(parts: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Each block's chunks concatenated, [T, D], each freed as it is joined (peak: the whole plus one block)."""
    joined = []
    for chunks in parts:
        joined.append(torch.cat(chunks))
        chunks.clear()
    return joined
