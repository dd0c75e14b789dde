"""The MoE feed-forward block that replaces a dense FFN: a router, routed experts, an optional shared expert.

Legend: B batch, S sequence, T = B*S tokens, D hidden, E experts, k experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from factorllm import native
from factorllm.adapters import FFNWeights, adapter_for
from factorllm.config import FactorConfig
from factorllm.experts import DECODE_MAX_TOKENS, Experts
from factorllm.router import ROUTERS, Router, RouterOutput


class MoEFeedForward(nn.Module):
    """Drop-in replacement of a dense FFN module: `forward(hidden [B, S, D]) -> [B, S, D]`.

    Output: sum over the k chosen experts of weight * expert(x), plus the always-on shared expert and the dense
    FFN's output bias (added once: it belongs to no expert).

    Buffers: `neuron_index` [F] lists the dense FFN's neurons in expert order (shared expert first), so the
    dense FFN can be rebuilt and partitions compared.
    """

    def __init__(
        self,
        router: Router,
        experts: Experts,
        shared: Experts | None,
        b_out: torch.Tensor | None,
        neuron_index: torch.Tensor,
    ) -> None:
        super().__init__()
        self.router = router
        self.experts = experts
        self.shared = shared
        self.b_out = None if b_out is None else nn.Parameter(b_out.detach().clone())
        self.register_buffer("neuron_index", neuron_index.to(torch.int64))
        self._kernel: native.DecodeKernel | None = None  # the batch-1 kernel bound to these weights, see `forward`
        self._kernel_key: tuple | None = None

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_kernel": None, "_kernel_key": None}  # raw pointers: copies rebind

    @classmethod
    def from_dense(
        cls,
        mlp: nn.Module,
        config: FactorConfig,
        partition: list[torch.Tensor],
        shared: torch.Tensor | None = None,
        seed: int | None = None,
    ) -> MoEFeedForward:
        """Builds the MoE block from a dense FFN module without changing a weight.

        Args:
            mlp: a dense FFN module of a supported family (see `factorllm.adapters`).
            config: the factorization config (gating, router, top_k).
            partition: E index tensors over the FFN's neurons, disjoint; with `shared` they cover all F.
            shared: the neurons of the always-on shared expert, or None.
            seed: seed of the router's initialisation (default `config.seed`).

        Example:
            >>> part = list(torch.randperm(1536).view(8, 192))  # 8 experts of 192 neurons
            >>> moe = MoEFeedForward.from_dense(model.model.layers[0].mlp, FactorConfig(8, 2), part)
        """
        ffn = adapter_for(mlp).read(mlp)
        _check_partition(ffn, partition, shared, config)
        experts = Experts.from_ffn(ffn, partition)
        shared_experts = Experts.from_ffn(ffn, [shared]) if shared is not None and len(shared) else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed if seed is None else seed)
            net = ROUTERS.get(config.router)(ffn.hidden, config.num_experts, config.router_hidden)
        net.to(ffn.w_in.dtype)
        order = [shared] if shared is not None else []
        neuron_index = torch.cat([*order, *partition])
        return cls(Router(net, config.gating, config.top_k), experts, shared_experts, ffn.b_out, neuron_index)

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def route(self, x: torch.Tensor) -> RouterOutput:
        """Routing alone, [T, D] -> RouterOutput; the oracle gating runs every expert to score them."""
        scores = self.experts.output_norms(x) if self.router.gating == "oracle" else None  # [T, E]
        return self.router(x, scores)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel
        y = None if kernel is None else kernel.run(self._modules["router"], self._modules["experts"], hidden_states)
        if y is None:  # not one token for a bound batch-1 kernel (which runs router, top-k and experts in one call)
            y = self._routed(hidden_states)
        # NOTE: module dicts, not attributes: nn.Module.__getattr__ costs microseconds per decoded token
        shared, b_out = self._modules.get("shared"), self._parameters.get("b_out")  # None: plain attributes
        if shared is not None:
            x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, D]: Experts.expert takes rows of tokens
            y = y + shared.expert(0, x).view_as(y)
        if b_out is not None:
            y = y + b_out
        return y

    def _routed(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The routed experts' sum, [..., D] -> [..., D], on every path other than a bound batch-1 kernel."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, D]
        if x.shape[0] == 1 and not torch.is_grad_enabled() and (kernel := self.decode_kernel(x)) is not None:
            y = kernel(x)  # [1, D]; bound now, `forward` takes it directly from the next call on
        elif x.shape[0] > DECODE_MAX_TOKENS and not torch.is_grad_enabled() and self._prefill_routed_applies(x):
            y = native.prefill_routed(self._modules["router"], self._modules["experts"], x)[0]  # [T, D]
        elif self.router.gating == "oracle":
            # NOTE: the oracle needs every expert's output to choose; reuse it instead of running experts twice.
            outs = self.experts.all_outputs(x)  # [T, E, D]
            weights, indices = self.router(x, outs.norm(dim=-1))[1:]  # [T, k], [T, k]
            chosen = outs.gather(1, indices[..., None].expand(-1, -1, outs.shape[-1]))  # [T, k, D]
            y = (chosen * weights[..., None]).sum(dim=1)  # [T, D]
        else:
            _, weights, indices = self.router(x)
            y = self.experts(x, weights, indices)
        return y.view(shape)

    def decode_kernel(self, x: torch.Tensor) -> native.DecodeKernel | None:
        """The native batch-1 kernel for this block, or None where it does not apply (then: the torch path).

        It applies to inference on float32 CPU tensors, a linear router, the gatings in `native.GATINGS`,
        equal-width experts and an activation the kernel has; never with hooks on the router (routing traces
        must see every token). The torch path is also the kernel's test reference.

        NOTE: the answer (a kernel or None) is cached under everything it depends on: the router object, its k and
        gating (`set_routing_` swaps or edits them) and where the weights live. `forward` checks a bound kernel
        with `DecodeKernel.run`, cheaper than this key.
        """
        if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
            return None
        router, experts = self._modules["router"], self._modules["experts"]
        net = router._modules["net"]
        key = (router, experts, router.top_k, router.gating, type(net), native.weight_key(net, experts)
               if type(net) is nn.Linear else None)
        if self._kernel_key != key:
            self._kernel, self._kernel_key = self._bind_kernel(router, experts), key
        return None if _hooked(router) else self._kernel

    def _prefill_routed_applies(self, x: torch.Tensor) -> bool:
        """Whether `native.prefill_routed` runs these tokens: inference on float32 CPU, a linear router with a
        gating the kernel has, experts on the many-token kernel's path, and no hooks on the router or the
        experts (they would not see the call). The router-then-experts path below is its reference."""
        router, experts = self._modules["router"], self._modules["experts"]
        net = router._modules["net"]
        return (type(net) is nn.Linear and router.gating in native.GATINGS and experts.path in (None, "sorted")
                and _kernel_tensors(x, net.weight, net.bias) and native.prefill_available(experts)
                and not _hooked(router) and not (experts._forward_hooks or experts._forward_pre_hooks))

    @staticmethod
    def _bind_kernel(router: Router, experts: Experts) -> native.DecodeKernel | None:
        net = router.net
        if type(net) is not nn.Linear or router.gating not in native.GATINGS or experts.padded:
            return None
        if not native.available() or not _kernel_tensors(net.weight, net.bias, experts.w_in, experts.b_in,
                                                         experts.w_out):
            return None
        act = native.act_code(experts.act)
        return None if act is None else native.DecodeKernel(router, experts, act)

    def to_dense_weights(self) -> FFNWeights:
        """The dense FFN this block was cut from, rebuilt from the experts (its neurons in original order)."""
        groups = ([self.shared] if self.shared is not None else []) + [self.experts]
        parts: dict[str, list[torch.Tensor]] = {"w_in": [], "w_up": [], "w_out": [], "b_in": [], "b_up": []}
        for g in groups:
            I = g.width
            for e, n in enumerate(g.sizes):
                parts["w_in"].append(g.w_in[e, :n])
                parts["w_out"].append(g.w_out[e, :, :n].t())
                if g.gated:
                    parts["w_up"].append(g.w_in[e, I : I + n])
                if g.b_in is not None:
                    parts["b_in"].append(g.b_in[e, :n])
                    if g.gated:
                        parts["b_up"].append(g.b_in[e, I : I + n])
        inverse = torch.empty_like(self.neuron_index)
        inverse[self.neuron_index] = torch.arange(len(inverse), device=inverse.device)
        cat = {k: (torch.cat(v)[inverse] if v else None) for k, v in parts.items()}  # rows back in dense order
        return FFNWeights(
            gated=self.experts.gated, w_in=cat["w_in"], w_up=cat["w_up"], w_out=cat["w_out"].t(),
            act=self.experts.act, b_in=cat["b_in"], b_up=cat["b_up"], b_out=self.b_out,
        )


def _kernel_tensors(*tensors: torch.Tensor | None) -> bool:
    """Whether the native kernels can read these tensors (None: an absent bias): float32, CPU, contiguous."""
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())
               for t in tensors)


def _hooked(router: Router) -> bool:
    """Whether forward hooks watch the router or its network (then every token must go through them)."""
    net = router._modules["net"]  # NOTE: not router.net: nn.Module.__getattr__ costs a microsecond per token
    return bool(router._forward_hooks or router._forward_pre_hooks or net._forward_hooks or net._forward_pre_hooks)


def _check_partition(
    ffn: FFNWeights, partition: list[torch.Tensor], shared: torch.Tensor | None, config: FactorConfig
) -> None:
    if len(partition) != config.num_experts:
        raise ValueError(f"partition has {len(partition)} experts, config.num_experts={config.num_experts}")
    groups = ([shared] if shared is not None else []) + list(partition)
    if any(len(g) == 0 for g in partition):
        raise ValueError("every expert needs at least one neuron; use fewer experts")
    allidx = torch.cat(groups)
    if len(allidx) != ffn.width or not torch.equal(allidx.sort().values, torch.arange(ffn.width)):
        raise ValueError(
            f"the partition must cover each of the FFN's {ffn.width} neurons exactly once "
            f"(got {len(allidx)} indices, {allidx.unique().numel()} distinct)"
        )


def moe_layers(model: nn.Module) -> list[tuple[str, MoEFeedForward]]:
    """`(qualified name, block)` of every MoE block in a factorized model, in layer order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoEFeedForward)]


def set_routing_(model: nn.Module, top_k: int | None = None, gating: str | None = None) -> nn.Module:
    """Changes k and/or the gating of every MoE block in place (the experts stay as they are).

    Example:
        >>> set_routing_(model, top_k=4, gating="oracle")
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE blocks; factorize it first with factorllm.convert_")
    for _, block in layers:
        new = FactorConfig(
            num_experts=block.num_experts,
            top_k=block.router.top_k if top_k is None else top_k,
            gating=block.router.gating if gating is None else gating,
        )  # validates
        block.router = Router(block.router.net, new.gating, new.top_k, block.router.straight_through)
    cfg = getattr(model, "factor_config", None)
    if cfg is not None:
        model.factor_config = FactorConfig.from_dict(
            {**cfg.to_dict(), "top_k": new.top_k, "gating": new.gating}
        )
    return model
