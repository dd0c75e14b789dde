"""Forward hooks that record what blocks see during a pass, removed on exit; what they record is the caller's
(nothing is stashed in globals or on the modules).

Legend: T tokens, D hidden.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def trace_inputs(blocks: Sequence[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Records each block's input during a forward pass, detached, as [T, D] (hooks, removed on exit); the
    list, in the blocks' order, is the caller's."""
    inputs: list[torch.Tensor | None] = [None] * len(blocks)

    def hook(i: int):
        def pre(_m, args):
            inputs[i] = args[0].detach().reshape(-1, args[0].shape[-1])
        return pre

    handles = [b.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        yield inputs
    finally:
        for h in handles:
            h.remove()
