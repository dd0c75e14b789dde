"""The CPU MoE kernels (csrc/moe_kernels.c): built once with the system C compiler, loaded with ctypes.

- `DecodeKernel`: one token through a routed block (router, top-k, gating, chosen experts) in one call.
- `prefill`: many tokens through the experts, grouped by expert, on MKL-packed weights, experts in parallel;
  `prefill_routed`: the same with a linear router's routing done in the call too.
- `SparseKernel`: a few tokens through an activation-sparse FFN (`factorllm.sparsity`), each token reading only
  the weights of its kept input channels and neurons.

Why C and not torch ops: see the comments in csrc/moe_kernels.c. The library is compiled on first use
into factorllm's cache (`loading.cache_dir()`)/native, keyed on the source, the flags and the CPU,
and loaded into the process after torch so it shares torch's OpenMP runtime. Without a compiler, or with
FACTORLLM_NATIVE=0, `available()` is False and callers keep the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from factorllm import mkl
from factorllm.loading import cache_dir

SOURCE = Path(__file__).parent / "csrc" / "moe_kernels.c"
# -fno-math-errno -fno-trapping-math: no errno or FP traps in the kernels, so the activation loops vectorize
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-std=c11"]
GATINGS = {"sum": 0, "hard": 1, "softmax_renorm": 2, "softmax": 3}
_ACT_CODES = {"silu": 0, "gelu_tanh": 1, "gelu_erf": 2, "relu": 3}
# Many-token kernel: experts whose projections hold fewer weights run one per thread, larger ones one at a
# time on all threads (see csrc/moe_kernels.c; SmolLM2's 192x576 experts below, TinyLlama's 704x2048 above).
PARALLEL_EXPERTS_BELOW = 1 << 20


def _cpu_key() -> str:
    try:  # -march=native: a library built on one CPU may not run on another
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _build(cc: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cc, *FLAGS, platform.machine(), _cpu_key()]).encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"moe_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # atomic: build aside, then rename
        built = Path(tmp) / target.name
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], check=True, capture_output=True, text=True)
        os.replace(built, target)
    return target


@functools.cache
def _lib():
    if os.environ.get("FACTORLLM_NATIVE", "1") == "0" or platform.system() != "Linux":
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        warnings.warn(f"factorllm: the native MoE kernels did not build ({detail}); using torch ops "
                      "(set FACTORLLM_NATIVE=0 to skip the attempt)", stacklevel=3)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    fn = lib.factorllm_moe_decode
    fn.restype = i
    fn.argtypes = [p, p, p]
    lib.factorllm_act.restype, lib.factorllm_act.argtypes = ctypes.c_float, [ctypes.c_float, i]
    fn = lib.factorllm_moe_prefill
    fn.restype = i
    fn.argtypes = [p, i, i, p, p, i, i, i, i, i, p, p, p, p, p, p, p, p, p, p, i]
    fn = lib.factorllm_moe_prefill_routed
    fn.restype = i
    fn.argtypes = [p, p, i, *lib.factorllm_moe_prefill.argtypes]
    fn = lib.factorllm_sparse_ffn
    fn.restype = i
    fn.argtypes = [p, p, i, i, i, p]
    return lib


def available() -> bool:
    return _lib() is not None


@functools.cache
def _act_code_for(act_type: type, approximate: str) -> int | None:
    """The kernel's activation that matches a module type, checked numerically (any class, no name list)."""
    act = act_type(approximate=approximate) if approximate else act_type()
    probe = torch.linspace(-6, 6, 97)
    want = act(probe)
    for code in _ACT_CODES.values():
        got = torch.tensor([_lib().factorllm_act(float(v), code) for v in probe])
        if torch.allclose(got, want, atol=1e-6, rtol=1e-5):
            return code
    return None


def act_code(act: nn.Module) -> int | None:
    approximate = getattr(act, "approximate", "") if isinstance(act, nn.GELU) else ""
    try:
        return _act_code_for(type(act), approximate)
    except TypeError:  # an activation module that takes constructor arguments: no kernel for it
        return None


class _DecodeArgs(ctypes.Structure):
    """Mirror of DecodeArgs in csrc/moe_kernels.c."""

    _fields_ = [(name, ctypes.c_void_p) for name in
                ("router_w", "router_b", "w_in", "b_in", "w_out", "scratch", "chosen", "weights", "gemv")]
    _fields_ += [(name, ctypes.c_int) for name in ("D", "E", "k", "I", "gated", "act", "gating")]


class DecodeKernel:
    """The batch-1 kernel bound to one MoE block's router and experts: `__call__(x [..., D], one token) -> same shape`.

    NOTE: it holds raw pointers, so `run` checks on every call that it is still bound to what it was built
    from (the router object, its k and gating, no hooks, the same weights at the same addresses); the block
    rebinds when not. The fixed arguments live in one C struct, so a call converts three arguments instead of
    eighteen. At batch 1 a SmolLM2 block's kernel takes ~60 us and each Python-level op ~1-5 us (caches cold
    from the layers between two calls), so the checks read module dicts, never nn.Module.__getattr__.
    """

    def __init__(self, router: nn.Module, experts, act: int) -> None:
        net = router._modules["net"]
        E, mI, D = experts.w_in.shape
        self.router, self.net, self.experts = router, net, experts
        self.top_k, self.gating, self.D = router.top_k, router.gating, D
        self.tensors = (net.weight, net.bias, experts.w_in, experts.b_in, experts.w_out)  # keeps them alive
        self.ptrs = weight_key(net, experts)
        self.chosen = (ctypes.c_int * self.top_k)()  # the kernel writes the routing here (kept for inspection)
        self.weights = (ctypes.c_float * self.top_k)()
        self.scratch = experts.w_in.new_empty(self.top_k * (mI + D))  # one per block: calls on it are serial
        # NOTE: MKL's GEMV streams cold weights faster than the kernel's own loops (measured in SmolLM2 decode:
        # 1.37x against 1.34x dense; 2048x5632 layer: 0.28 against 0.30 of dense); the loops stay for builds
        # without MKL.
        self.args = _DecodeArgs(
            *self.ptrs, self.scratch.data_ptr(), ctypes.addressof(self.chosen), ctypes.addressof(self.weights),
            mkl.gemv_address(), D, E, self.top_k, experts.width, int(experts.gated), act, GATINGS[self.gating])
        self.args_ref = ctypes.byref(self.args)
        self._fn = _lib().factorllm_moe_decode

    def run(self, router: nn.Module, experts, x: torch.Tensor) -> torch.Tensor | None:
        """x's output, or None where this kernel may not run it: x must be one float32 CPU token under no_grad,
        and the kernel still bound to these modules, their k, gating and weights, with no hooks on the router.

        NOTE: one method that checks and runs, cheapest checks first: each Python-level step costs 1-5 us with
        the caches cold from the layers between two calls, and the kernel itself ~60 us at SmolLM2's size.
        """
        net = self.net
        if (torch.is_grad_enabled() or router is not self.router or experts is not self.experts
                or x.numel() != self.D or x.size(-1) != self.D or x.dtype is not torch.float32 or not x.is_cpu
                or not x.is_contiguous() or router.top_k != self.top_k or router.gating != self.gating
                or router._modules["net"] is not net or router._forward_hooks or router._forward_pre_hooks
                or net._forward_hooks or net._forward_pre_hooks):  # the hooks: moe._hooked's test, inlined
            return None
        if weight_key(net, experts) != self.ptrs:
            return None  # a weight moved (`.to`, `.data =`, a new Parameter): the block rebinds
        return self(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        if self._fn(self.args_ref, x.data_ptr(), out.data_ptr()) != 0:
            raise RuntimeError(f"the batch-1 MoE kernel refused its arguments (E={self.args.E}, k={self.args.k})")
        return out


def weight_key(router: nn.Linear, experts) -> tuple:
    """Where the kernel's weights live; a change means the kernel must be rebound.

    NOTE: reads the parameter dicts directly: nn.Module.__getattr__ would cost a microsecond a lookup, on every
    decoded token of every layer.
    """
    r, e = router._parameters, experts._parameters
    bias, b_in = r.get("bias"), e.get("b_in")  # NOTE: unrolled: a generator costs more than the five lookups
    return (r["weight"].data_ptr(), None if bias is None else bias.data_ptr(), e["w_in"].data_ptr(),
            None if b_in is None else b_in.data_ptr(), e["w_out"].data_ptr())


class _Scratch:
    """The many-token kernel's scratch buffers, kept between calls while they stay under SCRATCH_KEEP_BYTES.

    NOTE: fresh buffers cost a page fault per 4 KiB on every call (the allocator returns large blocks to the
    system): ~4 MB per SmolLM2 layer at 512 tokens, 0.03-0.04 of the dense FFN's time (measured here, one
    process, interleaved). One set per thread, as calls on one thread are serial and layers run one after
    another, so a whole model shares one set.
    """

    def __init__(self) -> None:
        self.floats, self.ints = torch.empty(0), torch.empty(0, dtype=torch.int64)

    def grow(self, floats: int, ints: int) -> _Scratch:
        if self.floats.numel() < floats:
            self.floats = torch.empty(floats)
        if self.ints.numel() < ints:
            self.ints = torch.empty(ints, dtype=torch.int64)
        return self

    def release(self) -> None:
        if self.floats.numel() * 4 + self.ints.numel() * 8 > SCRATCH_KEEP_BYTES:
            self.__init__()


SCRATCH_KEEP_BYTES = 64 << 20  # TinyLlama's 2048x5632 block at 1024 tokens, top-2 of 8: 28 MB
_thread_scratch = threading.local()


def _aligned(floats: int) -> int:
    return -(-floats // 16) * 16


def _scratch(floats: int, ints: int) -> _Scratch:
    """This thread's scratch, at least `floats` float32 and `ints` int64 entries."""
    scratch = getattr(_thread_scratch, "value", None)
    if scratch is None:
        scratch = _thread_scratch.value = _Scratch()
    return scratch.grow(floats, ints)


def prefill_available(experts) -> bool:
    """Whether `prefill` runs these experts: the kernels built, the experts packable (see Experts.can_pack) and
    their activation one the kernels have."""
    return available() and experts.can_pack and act_code(experts.act) is not None


def prefill(experts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Inference: sum over each token's k experts of weight * expert(x): x [T, D] -> [T, D].

    Experts must satisfy `prefill_available`; x float32 contiguous. No autograd.
    """
    idx = indices.to(torch.int64).contiguous()  # [T, k]
    w = weights.to(torch.float32).contiguous()  # [T, k]
    out, rc = _run_prefill(experts, x, idx.shape[1], lambda *rest: _lib().factorllm_moe_prefill(
        x.data_ptr(), x.shape[0], x.shape[1], idx.data_ptr(), w.data_ptr(), *rest))
    if rc != 0:
        raise ValueError(f"expert indices must lie in [0, {experts.num_experts})")
    return out


def prefill_routed(router: nn.Module, experts, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inference: the routed block on many tokens in one call, routing included: x [T, D] ->
    (out [T, D], weights [T, k], indices [T, k]).

    The router must be a float32 `Router` over an `nn.Linear` with a gating in GATINGS, the experts satisfy
    `prefill_available`; x float32 contiguous. No autograd. Routes as the batch-1 kernel does (ties to the lower
    index, as torch.topk on CPU).
    """
    net, k = router._modules["net"], router.top_k
    T = x.shape[0]
    idx, w = torch.empty(T, k, dtype=torch.int64), torch.empty(T, k)  # written by the kernel
    bias = net._parameters.get("bias")
    out, rc = _run_prefill(experts, x, k, lambda *rest: _lib().factorllm_moe_prefill_routed(
        net.weight.data_ptr(), None if bias is None else bias.data_ptr(), GATINGS[router.gating], x.data_ptr(), T,
        x.shape[1], idx.data_ptr(), w.data_ptr(), *rest))
    if rc != 0:
        raise ValueError(f"the many-token kernel takes up to 1024 experts and 1 <= k <= E (E={experts.num_experts}, "
                         f"k={k})")
    return out, w, idx


def _run_prefill(experts, x: torch.Tensor, k: int, call) -> tuple[torch.Tensor, int]:
    """Packed weights, scratch and output for the many-token kernels; `call(k, E, ...)` passes the arguments
    from k on (the two kernels share them)."""
    packed = experts.packed()
    T, D = x.shape
    E, mI, _ = experts.w_in.shape
    if experts._prefill_ptrs is None or experts._prefill_ptrs[0] is not packed:  # rebuilt with the packed weights
        ptrs = ctypes.c_void_p * E
        experts._prefill_ptrs = (packed, ptrs(*[p[0].buffer.data_ptr() for p in packed]),
                                 ptrs(*[p[1].buffer.data_ptr() for p in packed]))
    _, p_in, p_out = experts._prefill_ptrs
    S = T * k
    out = x.new_empty(T, D)
    at_h, at_w = _aligned(S * D), _aligned(S * D) + _aligned(S * mI)  # each buffer on a cache line (64 B)
    scratch = _scratch(at_w + S, S + E + 1)
    xs, h, w_sorted = scratch.floats[:at_h], scratch.floats[at_h:at_w], scratch.floats[at_w:]  # [S*D], [S*mI], [S]
    slot, start = scratch.ints[:S], scratch.ints[S:]  # [S], [E + 1]
    rc = call(k, E, experts.width, int(experts.gated), act_code(experts.act), p_in, p_out,
              None if experts.b_in is None else experts.b_in.data_ptr(), mkl.compute_address(), out.data_ptr(),
              xs.data_ptr(), h.data_ptr(), w_sorted.data_ptr(), slot.data_ptr(), start.data_ptr(),
              int(experts.width * D < PARALLEL_EXPERTS_BELOW))
    scratch.release()
    return out, rc


class _SparseArgs(ctypes.Structure):
    """Mirror of SparseArgs in csrc/moe_kernels.c."""

    _fields_ = [(name, ctypes.c_void_p) for name in
                ("w_in_t", "b_in", "col", "w_out_t", "out_norm", "b_out", "w_gate", "w_up", "h", "score", "kept")]
    _fields_ += [(name, ctypes.c_int) for name in ("D", "F", "gated", "act", "exact")]


class SparseKernel:
    """A `SparseFFN` on a few tokens, each reading only its kept weights: `__call__(x [T, D], keep_in, keep_h)`.

    It holds the FFN's weights once more, transposed (a kept channel or neuron is one contiguous row; see
    csrc/moe_kernels.c), and the channel and neuron norms the FFN chooses by; `key` is where and at which
    version the FFN's weights were when it copied them: the FFN builds a new kernel when that changes (an
    optimizer step, `.to`, a new Parameter).
    """

    def __init__(self, ffn: nn.Module, act: int) -> None:
        F, D = ffn.w_in.shape
        with torch.no_grad():
            pick = ffn.chooser()  # the input-sparse pass reads the learned chooser's projections where fitted
            w_in = pick.w_in if not ffn.gated else torch.cat([pick.w_in, pick.w_up])  # [m*F, D]
            biases = [ffn.b_in] if not ffn.gated else [ffn.b_in, ffn.b_up]
            b_in = None if all(b is None for b in biases) else torch.cat(
                [torch.zeros(F) if b is None else b for b in biases])  # [m*F]
            self.tensors = (w_in.t().contiguous(), b_in, ffn.channel_norms().contiguous(),  # [D, m*F], [m*F], [D]
                            ffn.w_out.t().contiguous(), ffn.neuron_norms().contiguous(),  # [F, D], [F]
                            None if ffn.b_out is None else ffn.b_out.detach().contiguous(),  # [D]
                            # exact neurons: the input projections' rows as they are, [F, D] (no copy)
                            ffn.w_in.detach().contiguous() if ffn.exact_neurons else None,
                            ffn.w_up.detach().contiguous() if ffn.exact_neurons and ffn.gated else None)
        side = max(D, F)
        self.h, self.score = torch.empty(w_in.shape[0]), torch.empty(2 * side)  # scratch: calls are serial
        self.kept = torch.empty(side, dtype=torch.int32)
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        self.args = _SparseArgs(*map(ptr, self.tensors), self.h.data_ptr(), self.score.data_ptr(),
                                self.kept.data_ptr(), D, F, int(ffn.gated), act, int(ffn.exact_neurons))
        self.args_ref = ctypes.byref(self.args)
        self.key = sparse_key(ffn)
        self.D, self.exact = D, ffn.exact_neurons
        self._fn = _lib().factorllm_sparse_ffn

    def __call__(self, x: torch.Tensor, keep_in: int, keep_h: int) -> torch.Tensor:
        """x [T, D] float32 contiguous -> [T, D]."""
        out = torch.empty_like(x)
        if self._fn(self.args_ref, x.data_ptr(), x.shape[0], keep_in, keep_h, out.data_ptr()) != 0:
            raise ValueError(f"keep_in={keep_in} and keep_h={keep_h} must lie in [1, {self.D}] and "
                             f"[1, {self.args.F}]")
        return out


def sparse_key(ffn: nn.Module) -> tuple:
    """Where a SparseFFN's weights are and their versions (in-place updates bump a tensor's version)."""
    return tuple(None if p is None else (p.data_ptr(), p._version) for p in ffn._parameters.values())
