"""The rank-gradient reduction over tokens (design.md §4) and its launcher.

    out [C, R] = Σ_m a[m, c] · (p[m, r] · rscale[r])          a [M, C] (input dtype), p [M, R] (fp32)

Backward runs it twice: ``G = dyᵀ S`` (a = dy, p = T, rscale = u; one pass over dy, giving dB and dv) and
``dAᵀ = xᵀ dT`` (a = x, p = dS, rscale = u). Each program owns ``BLOCK_C`` rows of ``out`` and one of
``SPLIT`` interleaved slices of the tokens. Two ways to combine the slices:

- ``deterministic=False``: fp32 ``atomic_add`` into ``out`` (fast, summation order varies between runs);
- ``deterministic=True``: each program stores its fp32 partial in ``[SPLIT, C, R]``, summed afterwards in a
  fixed order — bitwise-identical results across runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import configs
from .common import FP_FUSION, as_operand, dot_precision, upcast_bf16

__all__ = ["rank_grad"]

_TARGET_PROGRAMS = 264
"""Aim for about two waves of an H100's 132 SMs when splitting the tokens."""


@triton.jit
def _rank_grad_kernel(
    # pointers
    a_ptr,
    p_ptr,
    rscale_ptr,
    out_ptr,
    # sizes
    M,
    C,
    R,
    SPLIT,
    # strides
    stride_am,
    stride_ac,
    stride_pm,
    stride_pr,
    stride_os,
    stride_oc,
    stride_or,
    # compile-time switches and tiles
    HAS_RSCALE: tl.constexpr,
    USE_ATOMIC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_c = offs_c < C
    mask_r = offs_r < R
    if HAS_RSCALE:
        rscale = tl.load(rscale_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)

    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    # token tiles pid_s, pid_s + SPLIT, pid_s + 2·SPLIT, ...
    for m0 in range(pid_s * BLOCK_M, M, SPLIT * BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < M
        a_ptrs = a_ptr + offs_m[None, :] * stride_am + offs_c[:, None] * stride_ac  # [BLOCK_C, BLOCK_M] = aᵀ
        p_ptrs = p_ptr + offs_m[:, None] * stride_pm + offs_r[None, :] * stride_pr  # [BLOCK_M, BLOCK_R]
        a_t = tl.load(a_ptrs, mask=mask_c[:, None] & mask_m[None, :], other=0.0)
        p = tl.load(p_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if HAS_RSCALE:
            p = p * rscale[None, :]
        if UPCAST:  # interpreter only (see common.py)
            a_t = a_t.to(tl.float32)
        # acc += aᵀ·(p ⊙ rscale), p rounded to the input dtype as a dot operand
        acc = tl.dot(a_t, as_operand(p, a_ptr.dtype.element_ty, UPCAST), acc, input_precision=PRECISION)

    out_ptrs = out_ptr + pid_s * stride_os + offs_c[:, None] * stride_oc + offs_r[None, :] * stride_or
    mask = mask_c[:, None] & mask_r[None, :]
    if USE_ATOMIC:
        # relaxed: nothing reads out until the kernel has finished, so no ordering between programs is needed
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc, mask=mask)


def rank_grad(
    a: Tensor,
    p: Tensor,
    rscale: Tensor | None,
    *,
    deterministic: bool,
    transpose_out: bool = False,
    config: configs.RankGradConfig | None = None,
) -> Tensor:
    """``aᵀ [C, M] · (p [M, R] ⊙ rscale [R])`` → fp32 ``[C, R]`` (``[R, C]`` contiguous when ``transpose_out``).

    ``a`` in the input dtype (any strides), ``p`` and ``rscale`` float32.
    """
    M, C = a.shape
    R = p.shape[1]
    shape = (R, C) if transpose_out else (C, R)
    if M == 0:
        return torch.zeros(shape, device=a.device, dtype=torch.float32)
    block_r = configs.block_r_for(R)
    cfg = config or configs.rank_grad_config(block_r, a.dtype, a.device)
    num_c = triton.cdiv(C, cfg.block_c)
    num_m = triton.cdiv(M, cfg.block_m)
    # from the shapes only: the same split (and summation order) on every run
    split = max(1, min(num_m, _TARGET_PROGRAMS // num_c))
    if deterministic:
        buf = torch.empty((split, *shape), device=a.device, dtype=torch.float32)
    else:
        buf = torch.zeros(shape, device=a.device, dtype=torch.float32)
    stride_oc, stride_or = (buf.stride(-1), buf.stride(-2)) if transpose_out else (buf.stride(-2), buf.stride(-1))
    _rank_grad_kernel[(num_c, split)](
        a,
        p,
        rscale if rscale is not None else p,  # never read when HAS_RSCALE is False
        buf,
        M,
        C,
        R,
        split,
        a.stride(0),
        a.stride(1),
        p.stride(0),
        p.stride(1),
        buf.stride(0) if deterministic else 0,
        stride_oc,
        stride_or,
        HAS_RSCALE=rscale is not None,
        USE_ATOMIC=not deterministic,
        UPCAST=upcast_bf16(a.dtype),
        PRECISION=dot_precision(a.dtype),
        BLOCK_C=cfg.block_c,
        BLOCK_M=cfg.block_m,
        BLOCK_R=block_r,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        enable_fp_fusion=FP_FUSION,
    )
    return buf.sum(0) if deterministic else buf
