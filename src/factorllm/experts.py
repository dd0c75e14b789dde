"""Experts: the dense FFN's neurons cut into E groups, stored stacked.

Legend: T tokens, D hidden, E experts, k experts per token, I neurons per expert (the widest expert; narrower
ones are zero-padded), F the dense FFN width.

Expert e keeps rows S_e of W_in (and W_up) and columns S_e of W_out, so sum_e E_e(x) + b_out = FFN(x) exactly.
NOTE: zero padding is exact: a padded neuron has zero input weights and bias, so its activation is act(0) = 0
for SiLU/GELU/ReLU, and its output column is zero whatever the activation.
"""

from __future__ import annotations

import torch
from torch import nn

from factorllm.adapters import FFNWeights


class Experts(nn.Module):
    """E experts with stacked weights and the interface `forward(x [T, D], weights [T, k], indices [T, k])`.

    `forward` runs only the chosen experts, tokens sorted by expert into one contiguous GEMM each;
    `forward_naive` is the reference it is tested against; `all_outputs` runs every expert on every token.
    """

    def __init__(
        self,
        sizes: list[int],
        hidden: int,
        act: nn.Module,
        gated: bool,
        bias_in: bool = False,
        bias_up: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.sizes = [int(s) for s in sizes]
        self.gated = gated
        self.act = act
        num_experts, width = len(sizes), max(sizes)
        kw = {"dtype": dtype}
        self.w_in = nn.Parameter(torch.zeros(num_experts, width, hidden, **kw))  # [E, I, D]
        self.w_up = nn.Parameter(torch.zeros(num_experts, width, hidden, **kw)) if gated else None  # [E, I, D]
        self.w_out = nn.Parameter(torch.zeros(num_experts, hidden, width, **kw))  # [E, D, I]
        self.b_in = nn.Parameter(torch.zeros(num_experts, width, **kw)) if bias_in else None  # [E, I]
        self.b_up = nn.Parameter(torch.zeros(num_experts, width, **kw)) if bias_up else None  # [E, I]

    @property
    def num_experts(self) -> int:
        return len(self.sizes)

    @property
    def padded(self) -> bool:
        return min(self.sizes) != max(self.sizes)

    @classmethod
    def from_ffn(cls, ffn: FFNWeights, partition: list[torch.Tensor]) -> Experts:
        """Copies each expert's neurons out of the dense FFN; `partition[e]` holds expert e's neuron indices."""
        experts = cls(
            [len(idx) for idx in partition], ffn.hidden, ffn.act, ffn.gated,
            bias_in=ffn.b_in is not None, bias_up=ffn.b_up is not None, dtype=ffn.w_in.dtype,
        )
        with torch.no_grad():
            for e, idx in enumerate(partition):
                n = len(idx)
                experts.w_in[e, :n] = ffn.w_in[idx]
                experts.w_out[e, :, :n] = ffn.w_out[:, idx]
                if ffn.gated:
                    experts.w_up[e, :n] = ffn.w_up[idx]
                if ffn.b_in is not None:
                    experts.b_in[e, :n] = ffn.b_in[idx]
                if ffn.b_up is not None:
                    experts.b_up[e, :n] = ffn.b_up[idx]
        return experts

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its own tokens: [n, D] -> [n, D], on views of the stacked weights (no copy)."""
        n = self.sizes[e]
        b_in = None if self.b_in is None else self.b_in[e, :n]
        h = self.act(nn.functional.linear(x, self.w_in[e, :n], b_in))  # [n_tok, I_e]
        if self.gated:
            b_up = None if self.b_up is None else self.b_up[e, :n]
            h = h * nn.functional.linear(x, self.w_up[e, :n], b_up)
        return nn.functional.linear(h, self.w_out[e, :, :n])  # [n_tok, D]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sum over each token's k chosen experts of weight * expert output: [T, D] -> [T, D]."""
        T, D = x.shape
        k = indices.shape[1]
        flat = indices.reshape(-1)  # [T*k]  expert of each (token, slot)
        order = flat.argsort(stable=True)  # [T*k]  slots grouped by expert
        token = order // k  # [T*k]  token of each sorted slot
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        xs = x[token]  # [T*k, D]  one gather
        ys, start = [], 0
        for e, n in enumerate(counts):
            if n:
                ys.append(self.expert(e, xs[start : start + n]))  # [n, D]
            start += n
        y = torch.cat(ys) * weights.reshape(-1)[order, None].to(x.dtype)  # [T*k, D]
        return x.new_zeros(T, D).index_add_(0, token, y)  # one scatter back

    def forward_naive(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Reference: every expert on every token, combined by a dense [T, E] weight matrix."""
        combine = x.new_zeros(x.shape[0], self.num_experts)  # [T, E]
        combine.scatter_add_(1, indices, weights.to(x.dtype))
        return sum(combine[:, e : e + 1] * self.expert(e, x) for e in range(self.num_experts))

    def all_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: [T, D] -> [T, E, D], in two batched GEMMs (the cost of the dense FFN)."""
        T, D = x.shape
        E, I = self.w_in.shape[:2]
        h = x @ self.w_in.reshape(E * I, D).t()  # [T, E*I]
        if self.b_in is not None:
            h = h + self.b_in.reshape(-1)
        h = self.act(h)
        if self.gated:
            up = x @ self.w_up.reshape(E * I, D).t()  # [T, E*I]
            if self.b_up is not None:
                up = up + self.b_up.reshape(-1)
            h = h * up
        h = h.view(T, E, I).transpose(0, 1)  # [E, T, I]
        out = torch.bmm(h, self.w_out.transpose(1, 2))  # [E, T, D]
        return out.transpose(0, 1)  # [T, E, D]

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, sizes={self.sizes if self.padded else self.sizes[0]}, gated={self.gated}"
