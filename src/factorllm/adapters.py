"""FFN adapters: read a Hugging Face FFN module as plain weight matrices, whatever its family.

Two FFN shapes cover the supported decoders (F = FFN width, D = hidden):
- gated:  y = W_out (act(W_in x + b_in) * (W_up x + b_up)) + b_out     (SwiGLU/GeGLU: Llama, Mistral, Qwen2/3, Gemma)
- plain:  y = W_out act(W_in x + b_in) + b_out                         (GPT-2 Conv1D, GPT-NeoX, Phi)
An adapter is registered per family; `find_ffns` locates every decoder layer's FFN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from factorllm.registry import Registry


@dataclass
class FFNWeights:
    """The weights of one dense FFN, in `nn.Linear` orientation ([out, in])."""

    gated: bool
    w_in: torch.Tensor  # [F, D]  gate projection (gated) or input projection (plain)
    w_out: torch.Tensor  # [D, F]
    act: nn.Module
    w_up: torch.Tensor | None = None  # [F, D]  gated only
    b_in: torch.Tensor | None = None  # [F]
    b_up: torch.Tensor | None = None  # [F]
    b_out: torch.Tensor | None = None  # [D]

    @property
    def width(self) -> int:
        return self.w_in.shape[0]

    @property
    def hidden(self) -> int:
        return self.w_in.shape[1]

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """Neuron activations h(x): [T, D] -> [T, F]; the FFN output is h @ W_out.T + b_out."""
        h = self.act(nn.functional.linear(x, self.w_in, self.b_in))
        if self.gated:
            h = h * nn.functional.linear(x, self.w_up, self.b_up)
        return h

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.intermediate(x), self.w_out, self.b_out)


@dataclass(frozen=True)
class FFNAdapter:
    family: str
    matches: Callable[[nn.Module], bool]
    read: Callable[[nn.Module], FFNWeights]


ADAPTERS: Registry[FFNAdapter] = Registry("FFN family")


def _has(*names: str) -> Callable[[nn.Module], bool]:
    return lambda m: all(hasattr(m, n) for n in names)


def _bias(linear: nn.Module) -> torch.Tensor | None:
    return getattr(linear, "bias", None)


def _register(adapter: FFNAdapter) -> None:
    ADAPTERS.register(adapter.family)(adapter)


_register(FFNAdapter(
    family="gated (gate_proj/up_proj/down_proj: Llama, Mistral, Qwen2, Qwen3, Gemma)",
    matches=_has("gate_proj", "up_proj", "down_proj", "act_fn"),
    read=lambda m: FFNWeights(
        gated=True, w_in=m.gate_proj.weight, w_up=m.up_proj.weight, w_out=m.down_proj.weight, act=m.act_fn,
        b_in=_bias(m.gate_proj), b_up=_bias(m.up_proj), b_out=_bias(m.down_proj),
    ),
))
# NOTE: GPT-2's Conv1D stores weights as [in, out], the transpose of nn.Linear.
_register(FFNAdapter(
    family="plain Conv1D (c_fc/c_proj: GPT-2)",
    matches=_has("c_fc", "c_proj", "act"),
    read=lambda m: FFNWeights(
        gated=False, w_in=m.c_fc.weight.t(), w_out=m.c_proj.weight.t(), act=m.act,
        b_in=m.c_fc.bias, b_out=m.c_proj.bias,
    ),
))
_register(FFNAdapter(
    family="plain (dense_h_to_4h/dense_4h_to_h: GPT-NeoX, Pythia)",
    matches=_has("dense_h_to_4h", "dense_4h_to_h", "act"),
    read=lambda m: FFNWeights(
        gated=False, w_in=m.dense_h_to_4h.weight, w_out=m.dense_4h_to_h.weight, act=m.act,
        b_in=_bias(m.dense_h_to_4h), b_out=_bias(m.dense_4h_to_h),
    ),
))
_register(FFNAdapter(
    family="plain (fc1/fc2: Phi)",
    matches=_has("fc1", "fc2", "activation_fn"),
    read=lambda m: FFNWeights(
        gated=False, w_in=m.fc1.weight, w_out=m.fc2.weight, act=m.activation_fn,
        b_in=_bias(m.fc1), b_out=_bias(m.fc2),
    ),
))


def adapter_for(mlp: nn.Module) -> FFNAdapter:
    """The adapter that reads `mlp`, or a ValueError naming its class and the supported families."""
    for name in ADAPTERS.names():
        adapter = ADAPTERS.get(name)
        if adapter.matches(mlp):
            return adapter
    raise ValueError(
        f"unsupported FFN class {type(mlp).__name__}: factorllm supports the families "
        f"{ADAPTERS.names()}. Add an FFNAdapter in factorllm/adapters.py for this architecture."
    )


def ffns_gated(ffns: list[tuple[str, nn.Module]]) -> bool:
    """Whether a model's FFNs (`find_ffns`) are gated (gate, up and down projections) or plain (in and out): the
    first one's family, which all its layers share."""
    mlp = ffns[0][1]
    return adapter_for(mlp).read(mlp).gated


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's layer list: the first ModuleList whose every entry has an `mlp` (Llama `model.layers`,
    GPT-2 `transformer.h`, GPT-NeoX `gpt_neox.layers`)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(hasattr(m, "mlp") for m in module):
            return name, module
    raise ValueError(
        f"unsupported architecture {type(model).__name__}: found no list of decoder layers with an `mlp` "
        f"FFN module. factorllm supports decoders whose FFN is one of {ADAPTERS.names()} "
        "(OPT, for one, computes its FFN inline in the layer and is not supported)."
    )


def find_ffns(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(qualified name, module)` of every decoder layer's FFN, in layer order.

    Raises:
        ValueError: the architecture or an FFN class is not supported, or the model is already factorized.
    """
    from factorllm.moe import MoEFeedForward
    from factorllm.sparsity import SparseFFN

    prefix, layers = decoder_layers(model)
    ffns = [(f"{prefix}.{i}.mlp", layer.mlp) for i, layer in enumerate(layers)]
    if any(isinstance(m, MoEFeedForward) for _, m in ffns):
        raise ValueError("this model is already factorized; convert the dense model instead")
    if any(isinstance(m, SparseFFN) for _, m in ffns):
        raise ValueError("this model is already sparsified (factorllm.sparsify_); start from the dense model")
    for _, mlp in ffns:
        adapter_for(mlp)
    return ffns
