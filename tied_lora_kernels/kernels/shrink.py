"""The shrink of the two-pass strategy (docs/design.md §3, LoRAFusion's first kernel) and its launcher.

    t [M, R] = a [M, K] · down [K, R]        fp32 out; a, down in the input dtype

Forward: a = x, down = Aᵀ (t = T); backward: a = dy, down = s·v ⊙ B (t = dS). The fused GEMM then loads
``t`` instead of accumulating it in its K loop (``forward.py``, ``LOAD_T``). With adapter dropout
(``DROPOUT``, forward only) the kernel draws the keep mask of each ``a`` tile it loads, zeroes the dropped
entries, stores the mask as bits (``STORE_BITS``: when a backward will read them) and scales ``t`` by
``1 / (1 - p)`` at the end (``dropout.py``).

Why a Triton kernel and not ``torch.mm``: the GEMM and the backward need ``t`` in fp32 (the one-pass
kernel's ``t`` is an fp32 accumulator, and ``du = colsum(dS ⊙ T)`` sums over tokens). ``torch.mm`` on bf16
inputs returns bf16 (its fp32-output overload ``mm(..., out_dtype=)`` is CUDA-only and recent), and
upcasting ``x`` first would write and read a fp32 copy of it — twice the traffic the shrink exists to pay
once. This kernel reads ``a`` once, accumulates in fp32 and writes ``[M, R]`` fp32: one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import configs
from .common import FP_FUSION, cdiv, dot_precision, upcast_bf16
from .dropout import DropoutMask, draw_keep, keep_threshold, pack_bits

__all__ = ["shrink"]


@triton.jit
def _shrink_kernel(
    # pointers
    a_ptr,
    down_ptr,
    t_ptr,
    seed_ptr,
    bits_ptr,
    # sizes
    M,
    K,
    R,
    # strides
    stride_am,
    stride_ak,
    stride_dk,
    stride_dr,
    stride_tm,
    stride_tr,
    stride_bm,
    # scalars
    threshold,
    drop_scale,
    # compile-time switches and tiles
    DROPOUT: tl.constexpr,
    STORE_BITS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: M·K may pass 2³¹
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R

    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    d_ptrs = down_ptr + offs_k[:, None] * stride_dk + offs_r[None, :] * stride_dr  # [BLOCK_K, BLOCK_R]
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if DROPOUT:
        tl.static_assert(BLOCK_K % 8 == 0, "the mask is stored a byte per 8 columns")
        seed = tl.load(seed_ptr)
        offs_byte = tl.arange(0, BLOCK_K // 8)
        b_ptrs = bits_ptr + offs_m[:, None] * stride_bm + offs_byte[None, :]  # [BLOCK_M, BLOCK_K // 8]
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        mask_k = offs_k < K - k * BLOCK_K
        mask_a = mask_m[:, None] & mask_k[None, :]
        if DROPOUT:  # dropped entries of a load as zeros (their scale comes after the loop); the mask kept as bits
            keep = draw_keep(seed, offs_m, k * BLOCK_K, K, threshold, BLOCK_K) & mask_k[None, :]
            mask_a = mask_a & keep
            if STORE_BITS:
                mask_b = mask_m[:, None] & (offs_byte < tl.cdiv(K - k * BLOCK_K, 8))[None, :]
                tl.store(b_ptrs, pack_bits(keep, BLOCK_M, BLOCK_K), mask=mask_b)
                b_ptrs += BLOCK_K // 8
        a = tl.load(a_ptrs, mask=mask_a, other=0.0)
        d = tl.load(d_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if UPCAST:  # interpreter only (see common.py)
            a = a.to(tl.float32)
            d = d.to(tl.float32)
        t = tl.dot(a, d, t, input_precision=PRECISION)  # t += a·down
        a_ptrs += BLOCK_K * stride_ak
        d_ptrs += BLOCK_K * stride_dk
    if DROPOUT:
        t = t * drop_scale

    t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
    tl.store(t_ptrs, t, mask=mask_m[:, None] & mask_r[None, :])


def shrink(
    a: Tensor, down: Tensor, *, config: configs.ShrinkConfig | None = None, dropout: DropoutMask | None = None
) -> Tensor:
    """``a [M, K] · down [K, R]`` → fp32 ``[M, R]`` (``a`` and ``down`` in one dtype, any strides); with
    ``dropout``, ``(1 / (1 - p)) · (m ⊙ a) · down``, the keep mask ``m`` drawn from its seed (into its bits,
    unless they are None)."""
    a = configs.narrow_k_steps(a)
    M, K = a.shape
    R = down.shape[1]
    t = torch.empty((M, R), device=a.device, dtype=torch.float32)
    if M == 0:
        return t
    block_r = configs.block_r_for(R)
    if config is None:
        config = configs.shrink_config(block_r, a.dtype, a.device, configs.is_aligned(a), dropout=dropout is not None)
    cfg = config
    bits = dropout.bits if dropout is not None else None  # (None too when the draw is not kept)
    _shrink_kernel[(cdiv(M, cfg.block_m),)](
        a,
        down,
        t,
        dropout.seed if dropout is not None else t,  # these two only with DROPOUT
        bits if bits is not None else t,
        M,
        K,
        R,
        a.stride(0),
        a.stride(1),
        down.stride(0),
        down.stride(1),
        t.stride(0),
        t.stride(1),
        bits.stride(0) if bits is not None else 0,
        keep_threshold(dropout.p) if dropout is not None else 0,
        dropout.scale if dropout is not None else 1.0,
        DROPOUT=dropout is not None,
        STORE_BITS=bits is not None,
        UPCAST=upcast_bf16(a.dtype),
        PRECISION=dot_precision(a.dtype),
        BLOCK_M=cfg.block_m,
        BLOCK_K=cfg.block_k,
        BLOCK_R=block_r,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        enable_fp_fusion=FP_FUSION,
    )
    return t
