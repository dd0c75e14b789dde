"""Experts: the dense FFN's neurons cut into E groups, stored stacked, with several execution paths.

Legend: T tokens, D hidden, E experts, k experts per token, I neurons per expert (the widest expert; narrower
ones are zero-padded), m = 2 for gated FFNs (gate rows then up rows), 1 for plain ones, C padded tokens per expert.

Expert e keeps rows S_e of W_in (and W_up) and columns S_e of W_out, so sum_e E_e(x) + b_out = FFN(x) exactly.
Layout (the same as transformers' MixtralExperts, so export is a rename):
    w_in  [E, m*I, D]   rows [0, I) gate (or input) projection, rows [I, 2I) up projection
    b_in  [E, m*I]      optional
    w_out [E, D, I]
NOTE: zero padding is exact: a padded neuron has zero input weights and bias, so its activation is act(0) = 0
for SiLU/GELU/ReLU, and its output column is zero whatever the activation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from factorllm import mkl, native
from factorllm.adapters import FFNWeights
from factorllm.registry import Registry


class Experts(nn.Module):
    """E experts with stacked weights and the interface `forward(x [T, D], weights [T, k], indices [T, k])`.

    `forward` picks an execution path from `EXPERT_PATHS` by device and token count (or `self.path` if set);
    every path is tested against `naive`. `all_outputs` runs every expert on every token.
    """

    def __init__(
        self, sizes: list[int], hidden: int, act: nn.Module, gated: bool, bias_in: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.sizes = [int(s) for s in sizes]
        self.gated = gated
        self.act = act
        self.path: str | None = None  # None: choose automatically
        self._views: tuple | None = None  # cached per-expert weight views, see `views()`
        self._packed: tuple | None = None  # cached MKL-packed weights, see `packed()`
        self._prefill_ptrs: tuple | None = None  # their addresses, for factorllm.native.prefill
        E, I, m = len(sizes), max(sizes), 2 if gated else 1
        self.w_in = nn.Parameter(torch.zeros(E, m * I, hidden, dtype=dtype))  # [E, m*I, D]
        self.w_out = nn.Parameter(torch.zeros(E, hidden, I, dtype=dtype))  # [E, D, I]
        self.b_in = nn.Parameter(torch.zeros(E, m * I, dtype=dtype)) if bias_in else None  # [E, m*I]

    def __getstate__(self) -> dict:
        # The view cache is derived state: copies and pickles rebuild it (views of the old parameters would
        # point at the old storage, and autograd forbids copying views taken before an in-place update).
        return {**super().__getstate__(), "_views": None, "_packed": None, "_prefill_ptrs": None}

    @property
    def num_experts(self) -> int:
        return len(self.sizes)

    @property
    def width(self) -> int:
        """I, the padded expert width."""
        return self.w_out.shape[2]

    @property
    def padded(self) -> bool:
        return min(self.sizes) != max(self.sizes)

    @classmethod
    def from_ffn(cls, ffn: FFNWeights, partition: list[torch.Tensor]) -> Experts:
        """Copies each expert's neurons out of the dense FFN; `partition[e]` holds expert e's neuron indices."""
        has_bias = ffn.b_in is not None or ffn.b_up is not None
        experts = cls([len(i) for i in partition], ffn.hidden, ffn.act, ffn.gated, has_bias, ffn.w_in.dtype)
        I = experts.width
        with torch.no_grad():
            for e, idx in enumerate(partition):
                n = len(idx)
                experts.w_in[e, :n] = ffn.w_in[idx]
                experts.w_out[e, :, :n] = ffn.w_out[:, idx]
                if ffn.gated:
                    experts.w_in[e, I : I + n] = ffn.w_up[idx]
                if ffn.b_in is not None:
                    experts.b_in[e, :n] = ffn.b_in[idx]
                if ffn.b_up is not None:
                    experts.b_in[e, I : I + n] = ffn.b_up[idx]
        return experts

    # -- one expert ------------------------------------------------------------------------------------------

    def activation(self, h: torch.Tensor, n: int) -> torch.Tensor:
        """Neuron activations from the input projection's output: [.., m*I] -> [.., n]."""
        I = self.width
        if self.gated:
            return self.act(h[..., :n]) * h[..., I : I + n]
        return self.act(h[..., :n])

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its own tokens: [n_tok, D] -> [n_tok, D], on views of the stacked weights (no copy)."""
        n, I = self.sizes[e], self.width
        b_in = None if self.b_in is None else self.b_in[e]
        if n == I:
            h = nn.functional.linear(x, self.w_in[e], b_in)  # [n_tok, m*I]
            return nn.functional.linear(self.activation(h, n), self.w_out[e])  # [n_tok, D]
        # NOTE: a narrower expert slices its rows, so padding costs no compute.
        rows = torch.cat([torch.arange(n), torch.arange(I, I + n)]) if self.gated else slice(0, n)
        h = nn.functional.linear(x, self.w_in[e, rows], None if b_in is None else b_in[rows])  # [n_tok, m*n]
        a = self.act(h[:, :n]) * h[:, n:] if self.gated else self.act(h)
        return nn.functional.linear(a, self.w_out[e, :, :n])

    def views(self) -> tuple[list, list, list]:
        """Per-expert views (w_in[e] [m*I, D], w_out[e].T [I, D], b_in[e] or None), cached.

        NOTE: at batch 1 each indexing op costs as much as a small GEMV's arithmetic; views stay valid while
        the parameters keep their storage (in-place updates included), so the cache is keyed on the pointers.
        """
        key = (self.w_in.data_ptr(), self.w_out.data_ptr(), None if self.b_in is None else self.b_in.data_ptr())
        if self._views is None or self._views[0] != key:
            with torch.no_grad():
                b_in = [None] * self.num_experts if self.b_in is None else list(self.b_in.unbind(0))
                views = (list(self.w_in.unbind(0)), [w.t() for w in self.w_out.unbind(0)], b_in)
            self._views = (key, views)
        return self._views[1]

    @property
    def can_pack(self) -> bool:
        """Whether inference on many tokens runs on MKL-packed weights: equal float32 CPU experts whose
        projections hold at least PACK_MIN_BYTES each, and MKL present.

        NOTE: MKL's packed layout pads small matrices heavily (measured resident size against the weight: 1.2x
        for 384x576, 1.65x for 576x192, 4-8x below 200 KB), and the gain is in large GEMMs anyway.
        """
        E, mI, D = self.w_in.shape
        return (not self.padded and self.w_in.dtype == torch.float32 and self.w_in.device.type == "cpu"
                and min(mI, self.width) * D * 4 >= PACK_MIN_BYTES and mkl.available())

    def packed(self) -> list[tuple[mkl.PackedWeight, mkl.PackedWeight]] | None:
        """Per expert (w_in[e], w_out[e]) packed for MKL's GEMM, cached; None where packing does not apply.

        NOTE: the packed copies do not alias the parameters, so the cache is keyed on their storage and version
        counter (bumped by every in-place update: optimizer steps, load_state_dict). Writes through `.data`
        bypass the counter: call `self.clear_cache()` after them.
        """
        if not self.can_pack:
            return None
        key = (self.w_in.data_ptr(), self.w_in._version, self.w_out.data_ptr(), self.w_out._version)
        if self._packed is None or self._packed[0] != key:
            self._packed = self._prefill_ptrs = None  # free the stale copies before packing new ones
            with torch.no_grad():
                packs = [(mkl.pack(self.w_in[e]), mkl.pack(self.w_out[e]))
                         for e in range(self.num_experts)]
            self._packed = (key, packs)
        return self._packed[1]

    def clear_cache(self) -> None:
        """Drops the cached weight views and packed copies (rebuilt on the next forward)."""
        self._views = self._packed = self._prefill_ptrs = None

    def expert_into(
        self, e: int, x: torch.Tensor, out: torch.Tensor, scale: float | torch.Tensor = 1.0, accumulate: bool = False
    ) -> None:
        """Inference only: `out` [n_tok, D] (+)= scale * expert e on x [n_tok, D].

        `scale` is a float or per-token [n_tok, 1]; it multiplies the activations [n_tok, I], which is cheaper
        than scaling the output [n_tok, D]. In-place activations, no temporaries beyond the input projection.
        More than DECODE_MAX_TOKENS tokens use MKL-packed weights where available (see `mkl`).
        """
        n, I = self.sizes[e], self.width
        if n != I:
            y = self.expert(e, x) * scale
            out.add_(y) if accumulate else out.copy_(y)
            return
        packed = self.packed() if x.shape[0] > DECODE_MAX_TOKENS else None
        w_in, w_out_t, b_in = self.views()
        if packed is not None:
            h = mkl.linear(x, packed[e][0])  # [n_tok, m*I]
            if b_in[e] is not None:
                h.add_(b_in[e])
        else:
            h = nn.functional.linear(x, w_in[e], b_in[e])  # [n_tok, m*I]
        a = self.act.forward(h[:, :I])  # NOTE: .forward skips the module-call machinery (no hooks here)
        if self.gated:
            a.mul_(h[:, I:])
        if not isinstance(scale, float) or scale != 1.0:
            a.mul_(scale)
        if packed is not None:
            mkl.linear(a, packed[e][1], out=out, accumulate=accumulate)
        elif accumulate:
            out.addmm_(a, w_out_t[e])
        else:
            torch.mm(a, w_out_t[e], out=out)

    # -- routed forward ---------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sum over each token's k chosen experts of weight * expert output: [T, D] -> [T, D]."""
        path = self.path or choose_path(self, x, indices)
        if weights.dtype != x.dtype:
            weights = weights.to(x.dtype)
        return EXPERT_PATHS.get(path)(self, x, weights, indices)

    def forward_naive(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return naive_path(self, x, weights.to(x.dtype), indices)

    def all_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's neuron activations on every token: [T, D] -> [T, E, I], in one GEMM."""
        T, D = x.shape
        E, mI = self.w_in.shape[:2]
        h = x @ self.w_in.reshape(E * mI, D).t()  # [T, E*m*I]
        if self.b_in is not None:
            h = h + self.b_in.reshape(-1)
        return self.activation(h.view(T, E, mI), self.width)  # [T, E, I]

    def all_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: [T, D] -> [T, E, D], in two batched GEMMs (the cost of the dense FFN)."""
        a = self.all_activations(x)  # [T, E, I]
        out = torch.bmm(a.transpose(0, 1), self.w_out.transpose(1, 2))  # [E, T, D]
        return out.transpose(0, 1)  # [T, E, D]

    def output_norms(self, x: torch.Tensor) -> torch.Tensor:
        """||expert_e(x_t)|| for every token and expert: [T, D] -> [T, E], without the [T, E, D] outputs.

        ||W_e a||^2 = a^T (W_e^T W_e) a with W_e = w_out[e] [D, I]: an [I, I] Gram matrix per expert instead of
        a [T, I] x [I, D] product (128 experts of 10 neurons, 1024 tokens: the outputs were a fifth of an
        end-to-end training step). Narrow experts only: where I >= D the outputs are as cheap.
        """
        E, D, I = self.w_out.shape
        if I >= D:
            return self.all_outputs(x).norm(dim=-1)
        a = self.all_activations(x).transpose(0, 1)  # [E, T, I]
        gram = self.w_out.transpose(1, 2) @ self.w_out  # [E, I, I]
        sq = ((a @ gram) * a).sum(dim=-1)  # [E, T]
        return sq.clamp_min(0).sqrt().t()  # [T, E]; rounding can make a zero norm's square slightly negative

    def extra_repr(self) -> str:
        sizes = self.sizes if self.padded else self.sizes[0]
        return f"num_experts={self.num_experts}, sizes={sizes}, gated={self.gated}, path={self.path or 'auto'}"


# ---------------------------------------------------------------------------------------------------------------
# Execution paths: (experts, x [T, D], weights [T, k], indices [T, k]) -> [T, D]

ExpertPath = Callable[[Experts, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EXPERT_PATHS: Registry[ExpertPath] = Registry("expert path")

# NOTE: one padded bmm beats a loop of per-expert GEMMs by ~12% on this CPU (MKL threads one big call better
# than eight small ones), so it is taken while padding wastes less than that.
PADDED_MAX_WASTE = 1.12
PACK_MIN_BYTES = 256 * 1024
DECODE_MAX_TOKENS = 4
# NOTE: training, fine experts or a large share chosen: every expert masked (the dense FFN's cost) beats sorting,
# whose per-expert GEMM pairs and k copies of each token grow with E and k (measured here, forward + backward,
# 1024 tokens, 576 x 1280: E=8 k=2 sorted 25 ms / masked 51; E=8 k=4 40 / 57; E=32 k=8 67 / 56; E=128 k=51
# 404 / 59).
MASKED_MIN_EXPERTS = 16
MASKED_MIN_SHARE = 0.6


def choose_path(experts: Experts, x: torch.Tensor, indices: torch.Tensor) -> str:
    """The fastest path for this device and routing; see the NOTE on PADDED_MAX_WASTE."""
    T, k = indices.shape
    if T <= DECODE_MAX_TOKENS:
        return "decode"
    # NOTE: grouped GEMM kernels need 16-byte aligned rows, hence the width check.
    if x.is_cuda and hasattr(torch, "_grouped_mm") and not experts.padded and experts.width % 8 == 0:
        return "grouped_mm"
    if experts.padded:
        return "sorted"
    if not torch.is_grad_enabled() and experts.can_pack:
        # NOTE: per-expert GEMMs on packed weights beat one padded bmm even at perfect balance (measured here,
        # 2048x5632, 512 tokens: 0.29 of dense against 0.37 for padded, 0.33 for unpacked sorted).
        return "sorted"
    E = experts.num_experts
    if torch.is_grad_enabled() and (E >= MASKED_MIN_EXPERTS or k / E > MASKED_MIN_SHARE):
        return "masked"  # see MASKED_MIN_EXPERTS
    counts = torch.bincount(indices.reshape(-1), minlength=E)
    waste = counts.max().item() * E / (T * k)
    return "padded" if waste <= PADDED_MAX_WASTE else "sorted"


@EXPERT_PATHS.register("naive")
def naive_path(experts: Experts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Reference: every expert on every token, combined by a dense [T, E] weight matrix."""
    combine = x.new_zeros(x.shape[0], experts.num_experts).scatter_add(1, indices, weights)  # [T, E]
    return sum(combine[:, e : e + 1] * experts.expert(e, x) for e in range(experts.num_experts))


@EXPERT_PATHS.register("decode")
def decode_path(experts: Experts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """A few tokens (decoding): each token runs its k experts on views of the stacked weights, never copied.

    NOTE: at batch 1 the FFN is a few small matrix-vector products, so op count is what costs: without
    autograd each expert is three GEMV-sized calls accumulated in place.
    """
    if not torch.is_grad_enabled():
        out = x.new_zeros(x.shape)
        for t, (chosen, ws) in enumerate(zip(indices.tolist(), weights.tolist(), strict=True)):
            xt, ot = (x, out) if x.shape[0] == 1 else (x[t : t + 1], out[t : t + 1])
            if len(chosen) == 2 and not experts.padded and experts.w_in.is_contiguous():
                _decode_pair_into(experts, xt, ot, chosen, ws)
                continue
            for e, w in zip(chosen, ws, strict=True):
                experts.expert_into(e, xt, ot, scale=w, accumulate=True)
        return out
    rows = []
    for t, chosen in enumerate(indices.tolist()):
        xt = x[t : t + 1]  # [1, D]
        rows.append(sum(experts.expert(e, xt) * weights[t, j] for j, e in enumerate(chosen)))
    return torch.cat(rows)


def _pair(stacked: torch.Tensor, first: int, step: int) -> torch.Tensor:
    """A view [2, ...] of entries `first` and `first + step` of a contiguous stacked tensor [E, ...]."""
    inner = stacked.stride(0)
    return stacked.as_strided((2, *stacked.shape[1:]), (step * inner, *stacked.stride()[1:]),
                              stacked.storage_offset() + first * inner)


def _decode_pair_into(experts: Experts, x: torch.Tensor, out: torch.Tensor, chosen: list[int], ws: list[float]):
    """One token, two experts (top-2): `out` [1, D] += both experts' weighted outputs, in two `bmm`.

    The pair is a strided view of the stacked weights (stride = the distance between the two experts), never
    a copy. NOTE: at batch 1 each op's fixed cost (dispatch, thread wake-up, the first cache misses of a cold
    weight) rivals its arithmetic; two batched GEMVs instead of four halve the count of the costly ones.
    """
    (e0, w0), (e1, w1) = sorted(zip(chosen, ws, strict=True))
    E, mI, D = experts.w_in.shape
    I = experts.width
    step = e1 - e0  # > 0: top-k indices are distinct
    w_in = _pair(experts.w_in, e0, step)  # [2, m*I, D]
    w_out = _pair(experts.w_out, e0, step)  # [2, D, I]
    h = torch.bmm(x.expand(2, 1, D), w_in.transpose(1, 2))  # [2, 1, m*I]
    if experts.b_in is not None:
        h += _pair(experts.b_in, e0, step)[:, None]  # [2, 1, m*I]
    a = experts.act.forward(h[..., :I])  # [2, 1, I]
    if experts.gated:
        a.mul_(h[..., I:])
    a.mul_(torch.tensor([w0, w1], dtype=a.dtype).view(2, 1, 1))
    y = torch.bmm(a, w_out.transpose(1, 2))  # [2, 1, D]
    out.add_(y[0]).add_(y[1])


def _sort_by_expert(indices: torch.Tensor, num_experts: int):
    flat = indices.reshape(-1)  # [T*k]  expert of each (token, slot)
    order = flat.argsort(stable=True)  # [T*k]  slots grouped by expert
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    return flat, order, counts


@EXPERT_PATHS.register("sorted")
def sorted_path(experts: Experts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Many tokens: slots sorted by expert, one contiguous GEMM pair per expert, one scatter back.

    Inference on CPU runs all of it in one native call where it can (`native.prefill`: MKL-packed weights,
    experts in parallel); the loop below is its reference and the fallback.
    """
    if not torch.is_grad_enabled() and native.prefill_available(experts):
        return native.prefill(experts, x.contiguous(), weights, indices)
    T, k = indices.shape
    _, order, counts = _sort_by_expert(indices, experts.num_experts)
    token = order // k  # [T*k]  token of each sorted slot
    xs = x.index_select(0, token)  # [T*k, D]  one gather
    bounds = counts.cumsum(0).tolist()
    starts = [0, *bounds[:-1]]
    w = weights.reshape(-1)[order, None]  # [T*k, 1]  routing weight of each sorted slot
    groups = [(e, a, b) for e, (a, b) in enumerate(zip(starts, bounds, strict=True)) if b > a]
    if torch.is_grad_enabled():
        # NOTE: split, not xs[a:b]: each slice's backward writes a zero tensor the size of xs (128 experts, k = 51:
        # 5.4 s a layer), one split's backward concatenates the groups' gradients once.
        sizes = counts.tolist()
        xs_e, w_e = xs.split(sizes), w.split(sizes)
        y = torch.cat([experts.expert(e, xs_e[e]) * w_e[e] for e, _, _ in groups])
    else:  # NOTE: inference writes each expert's rows in place: no per-expert outputs, no concatenation
        y = torch.empty_like(xs)  # [T*k, D]
        for e, a, b in groups:
            experts.expert_into(e, xs[a:b], y[a:b], scale=w[a:b])
    return x.new_zeros(x.shape).index_add_(0, token, y)  # one scatter back


def _padded_layout(indices: torch.Tensor, weights: torch.Tensor, num_experts: int):
    """Rows of a [E, C] grid: the token each row reads (T = the zero row for padding) and its weight."""
    T, k = indices.shape
    flat, order, counts = _sort_by_expert(indices, num_experts)
    C = int(counts.max())
    starts = counts.cumsum(0) - counts  # [E]
    expert_of = flat[order]  # [T*k]
    dest = expert_of * C + torch.arange(T * k, device=flat.device) - starts[expert_of]  # [T*k] row in the grid
    src = torch.full((num_experts * C,), T, dtype=torch.long, device=flat.device)  # [E*C]
    src[dest] = order // k
    wgrid = weights.new_zeros(num_experts * C)  # [E*C]
    wgrid = wgrid.index_put((dest,), weights.reshape(-1)[order])
    return src, wgrid, C


@EXPERT_PATHS.register("padded")
def padded_path(experts: Experts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Many, well-balanced tokens: every expert's tokens padded to the largest group C, two bmm for all."""
    T, D = x.shape
    E = experts.num_experts
    src, wgrid, C = _padded_layout(indices, weights, E)
    xpad = torch.cat([x, x.new_zeros(1, D)]).index_select(0, src).view(E, C, D)  # [E, C, D]
    h = torch.bmm(xpad, experts.w_in.transpose(1, 2))  # [E, C, m*I]
    if experts.b_in is not None:
        h = h + experts.b_in[:, None]
    y = torch.bmm(experts.activation(h, experts.width), experts.w_out.transpose(1, 2))  # [E, C, D]
    y = y.reshape(E * C, D) * wgrid[:, None]  # padding rows have weight 0
    return x.new_zeros(T + 1, D).index_add_(0, src, y)[:T]


@EXPERT_PATHS.register("masked")
def masked_path(experts: Experts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Fine experts in training: every expert on every token in two GEMMs over the stacked weights, each expert's
    activations scaled by its combine weight (0 where not chosen). The dense FFN's cost whatever k, where the
    sorted path copies each token k times (128 experts, k = 51: a [T*51, D] gather and 128 tiny GEMM pairs)."""
    T, D = x.shape
    E, I = experts.num_experts, experts.width
    combine = x.new_zeros(T, E).scatter_add(1, indices, weights)  # [T, E]
    a = experts.all_activations(x) * combine[..., None]  # [T, E, I]
    w_out = experts.w_out.permute(1, 0, 2).reshape(D, E * I)  # [D, E*I]: expert e's neurons at e*I .. e*I + I
    return a.reshape(T, E * I) @ w_out.t()  # [T, D]


@EXPERT_PATHS.register("grouped_mm")
def grouped_mm_path(experts: Experts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """GPUs: slots sorted by expert, one `torch._grouped_mm` per projection over all experts' groups."""
    if not hasattr(torch, "_grouped_mm"):
        raise RuntimeError("this torch has no torch._grouped_mm; use the 'sorted' path")
    T, k = indices.shape
    _, order, counts = _sort_by_expert(indices, experts.num_experts)
    token = order // k
    offs = counts.cumsum(0).to(torch.int32)  # [E]  end row of each expert's group
    xs = x.index_select(0, token)  # [T*k, D]
    h = torch._grouped_mm(xs, experts.w_in.transpose(1, 2), offs=offs)  # [T*k, m*I]
    if experts.b_in is not None:
        h = h + experts.b_in.repeat_interleave(counts, dim=0, output_size=T * k)
    y = torch._grouped_mm(experts.activation(h, experts.width), experts.w_out.transpose(1, 2), offs=offs)
    y = y * weights.reshape(-1)[order, None]  # [T*k, D]
    return x.new_zeros(x.shape).index_add_(0, token, y)
