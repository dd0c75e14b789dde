"""MKL entry points that torch's x86 CPU build exports: GEMMs on pre-packed weights, and GEMV (CPU inference).

Why packed weights: a GEMM re-packs its weight matrix into the kernel's blocked layout on every call. For the
dense FFN's 512-row GEMMs that cost is amortised; for an expert's ~128 rows it is not (measured here, 2048x1408
weight: 266 GFLOP/s unpacked against 324 packed at 128 rows, 111 against 217 at 20 rows, while the dense
512-row GEMM runs at 301). Packing once and reusing the packed copy removes that cost.

torch links MKL into libtorch_cpu and exports `cblas_sgemm_pack`, `cblas_sgemm_compute` and `sgemv_`; torch's
own `mkl::_mkl_linear` only uses the packed GEMM when the row count equals the one packed for, so they are
called here through ctypes (and by address from factorllm.native's C kernels), for any row count. Builds
without MKL (aarch64, macOS) report `available() == False` and callers keep `nn.functional.linear`.

The packed copy costs as much memory as the weight it packs. Set FACTORLLM_PACKED_GEMM=0 to turn it off.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
from dataclasses import dataclass

import torch

_ROW_MAJOR, _NO_TRANS, _TRANS, _B_MATRIX, _PACKED = 101, 111, 112, 162, 151  # CBLAS enum values
_ROWS_HINT = 128  # rows MKL tunes the packed layout for; any row count works at compute time


@functools.cache
def _mkl():
    """MKL's packed-GEMM functions from libtorch_cpu, or None when this build does not export them."""
    if os.environ.get("FACTORLLM_PACKED_GEMM", "1") == "0" or not torch.backends.mkl.is_available():
        return None
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
        get_size, pack, compute = lib.cblas_sgemm_pack_get_size, lib.cblas_sgemm_pack, lib.cblas_sgemm_compute
        gemv = lib.sgemv_
    except (OSError, AttributeError):
        return None
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    get_size.restype, get_size.argtypes = ctypes.c_size_t, [i, i, i, i]
    pack.restype, pack.argtypes = None, [i, i, i, i, i, i, f, p, i, p]
    compute.restype, compute.argtypes = None, [i, i, i, i, i, i, p, i, p, i, f, p, i]
    return get_size, pack, compute, gemv


def available() -> bool:
    return _mkl() is not None


def compute_address() -> int:
    """The address of MKL's cblas_sgemm_compute, for native code that calls it directly (factorllm.native)."""
    return ctypes.cast(_mkl()[2], ctypes.c_void_p).value


def gemv_address() -> int | None:
    """The address of MKL's Fortran sgemv_, or None without MKL (factorllm.native then uses its own loops)."""
    return None if _mkl() is None else ctypes.cast(_mkl()[3], ctypes.c_void_p).value


@dataclass(frozen=True)
class PackedWeight:
    """A linear layer's weight [N, K] packed as the GEMM's B operand (B = weight^T, K x N)."""

    buffer: torch.Tensor  # opaque MKL layout, a view of `mapping`
    n: int  # output features
    k: int  # input features
    mapping: mmap.mmap | None = None  # the anonymous mapping holding it (unmapped when this is freed)


def pack(weight: torch.Tensor) -> PackedWeight:
    """Packs a float32 CPU weight [N, K] (rows contiguous, as `nn.Linear.weight`)."""
    mkl = _mkl()
    if mkl is None:
        raise RuntimeError("MKL's packed GEMM is not available in this torch build; use nn.functional.linear")
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.stride(1) != 1:
        raise ValueError("pack() takes a float32 CPU weight [N, K] with contiguous rows")
    get_size, pack_fn = mkl[:2]
    n, k = weight.shape
    size = get_size(_B_MATRIX, _ROWS_HINT, n, k)
    # NOTE: MKL sizes every packed buffer for its largest blocking (at least 9.2 MB here, even for a 0.2 MB
    # weight) and writes only part of it. A fresh anonymous mapping keeps the untouched part out of memory;
    # heap memory would be recycled already dirty, and 30 layers of small experts then fill 24 GB (seen here).
    mapping = mmap.mmap(-1, size + 4)
    buffer = torch.frombuffer(mapping, dtype=torch.float32)
    pack_fn(_ROW_MAJOR, _B_MATRIX, _TRANS, _ROWS_HINT, n, k, 1.0, weight.data_ptr(), weight.stride(0),
            buffer.data_ptr())
    return PackedWeight(buffer, n, k, mapping)


def packed_bytes(n: int, k: int) -> int:
    """Bytes MKL reserves for a packed [N, K] weight (mostly never touched, see `pack`)."""
    return _mkl()[0](_B_MATRIX, _ROWS_HINT, n, k)


def linear(x: torch.Tensor, w: PackedWeight, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """x [M, K] @ weight^T -> [M, N], into `out` if given (`accumulate`: out += instead of out =).

    x and out must be float32 with contiguous rows; no autograd (the packed copy is not a tracked tensor).
    """
    if x.dim() != 2 or x.shape[1] != w.k or x.stride(1) != 1 or x.dtype != torch.float32:
        raise ValueError(f"x must be float32 [M, {w.k}] with contiguous rows, got {tuple(x.shape)} {x.dtype}")
    m = x.shape[0]
    if out is None:
        out = x.new_empty(m, w.n)
        accumulate = False
    if out.shape != (m, w.n) or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {w.n}] with contiguous rows, got {tuple(out.shape)}")
    if m:
        _mkl()[2](_ROW_MAJOR, _NO_TRANS, _PACKED, m, w.n, w.k, x.data_ptr(), x.stride(0), w.buffer.data_ptr(), w.k,
                  1.0 if accumulate else 0.0, out.data_ptr(), out.stride(0))
    return out
