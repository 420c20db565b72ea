"""The adapters as a prefill GEMM reads them, in one launch: ``A`` in the input dtype and ``s·v ⊙ B``.

    a_out [R, K] = A.to(dtype)                      (only when asked: the forward's ``down``)
    b_out [N, R] = (s · v[:, None] ⊙ B).to(dtype)   (computed in fp32, rounded once; v = ones when None)

The forward's one-pass GEMM and the shrinks read both in the input dtype (docs/design.md §7: folding ``s·v`` into
``B`` inside the GEMM costs registers its prefill tiles do not have), and the backward's ``dx`` GEMM reads
``v ⊙ B`` (``scale`` 1: the backward applies ``s`` in fp32, since a small ``s·v ⊙ B`` rounded to fp16 can fall
below its normal range). Done with torch these were three launches in the forward and two in the backward, each a
few microseconds on a GPU for a few kilobytes; this kernel is one. It rounds exactly as the torch expressions
``A.to(dtype)`` and ``torch.mul(B.float(), s * v.float()[:, None], out=b_out)`` do (a test checks bit equality).

``b_out`` is a view whose row stride is padded to a multiple of 16 elements: the JIT then specialises the
kernels that read it on an aligned stride (what ``compile_check`` assumes), which saves ~90 registers in the
dx kernel at R = 128, and a TMA descriptor can describe it. The padding columns are written as zeros: a TMA
load of a box wider than ``R`` (the dx GEMM's ``[BLOCK_K, 16]`` tiles at ranks that are not multiples of 8)
must read zeros there, and should the hardware fetch the row's next 16-byte sector from memory rather than
fill it (known of TMA stores, not ruled out for loads), uninitialised memory there could hold NaN, and NaN·0
is NaN in every row of the tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import FP_FUSION, as_operand, cdiv, upcast_bf16

__all__ = ["prepare_adapters", "PREPARE_BLOCK", "PREPARE_WARPS"]

PREPARE_BLOCK, PREPARE_WARPS = 1024, 4
"""Elements per program and warps: a copy-like kernel over a few thousand to a few hundred thousand elements."""


@triton.jit
def _prepare_kernel(
    # pointers
    a_ptr,
    b_ptr,
    v_ptr,
    a_out_ptr,
    b_out_ptr,
    # sizes
    R,
    K,
    size_a,
    size_b,
    # strides
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_bon,
    # scalars
    scale,
    # compile-time switches and tiles
    CAST_A: tl.constexpr,
    HAS_V: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    DTYPE = b_out_ptr.dtype.element_ty
    # the bounds R·K and N·stride_bon come from the host: an int32 product here would wrap at 2³¹ (the JIT passes a
    # size past 2³¹ as int64)
    if CAST_A:  # a_out = A.to(dtype), contiguous [R, K]
        mask_a = offs < size_a
        a = tl.load(a_ptr + (offs // K) * stride_ar + (offs % K) * stride_ak, mask=mask_a, other=0.0)
        tl.store(a_out_ptr + offs, as_operand(a.to(tl.float32), DTYPE, UPCAST), mask=mask_a)
    # b_out = s·v ⊙ B: (s·v) first, then the product, both in fp32, rounded once (torch's order); over the padded
    # rows (stride_bon wide), the padding columns R.. set to zero
    n, r = offs // stride_bon, offs % stride_bon
    mask_b = offs < size_b
    mask_r = mask_b & (r < R)
    b = tl.load(b_ptr + n * stride_bn + r * stride_br, mask=mask_r, other=0.0).to(tl.float32)
    if HAS_V:
        v = tl.load(v_ptr + n, mask=mask_r, other=0.0).to(tl.float32)
        b = b * (scale * v)
    else:
        b = b * scale  # (a padding column: 0 · scale, finite since scale is)
    tl.store(b_out_ptr + offs, as_operand(b, DTYPE, UPCAST), mask=mask_b)


def prepare_adapters(
    A: Tensor, B: Tensor, v: Tensor | None, scale: float, dtype: torch.dtype, *, cast_a: bool
) -> tuple[Tensor, Tensor]:
    """``(A in dtype, s·v ⊙ B in dtype)`` from ``A [R, K]``, ``B [N, R]``, ``v [N]`` (any float dtypes and
    strides; a strided ``v`` is copied first). ``A`` comes back as it is unless ``cast_a`` and its dtype
    differs; ``s·v ⊙ B`` is ``[N, R]`` with a 16-aligned row stride. One launch."""
    (R, K), N = A.shape, B.shape[0]
    v = v.contiguous() if v is not None else None  # the kernel reads v with unit stride (free when it has one)
    padded = torch.empty((N, -(-R // 16) * 16), device=B.device, dtype=dtype)
    b_out = padded[:, :R]
    cast = cast_a and A.dtype != dtype
    a_out = torch.empty((R, K), device=A.device, dtype=dtype) if cast else A
    cast = cast and K > 0  # (nothing to copy; the kernel's offs // K would divide by zero)
    numel = max(padded.numel(), R * K if cast else 0)
    if numel == 0:
        return a_out, b_out
    _prepare_kernel[(cdiv(numel, PREPARE_BLOCK),)](
        A,
        B,
        v if v is not None else B,  # never read when HAS_V is False
        a_out,
        b_out,
        R,
        K,
        R * K,
        padded.numel(),
        A.stride(0),
        A.stride(1),
        B.stride(0),
        B.stride(1),
        b_out.stride(0),
        float(scale),
        CAST_A=cast,
        HAS_V=v is not None,
        UPCAST=upcast_bf16(dtype),
        BLOCK=PREPARE_BLOCK,
        num_warps=PREPARE_WARPS,
        enable_fp_fusion=FP_FUSION,
    )
    return a_out, b_out
