"""The one-pass fused GEMM (design.md §3) and its launcher: forward ``y`` and backward ``dx`` both run it.

    out = a·w + ((a·down) ⊙ rscale)·up (+ bias)      a [M, K], w [K, N], down [K, R], up [R, N], rscale [R]

Forward:  a = x,  w = Wᵀ,  down = Aᵀ,          rscale = u, up = (s·v ⊙ B)ᵀ; writes T = x Aᵀ (fp32).
Backward: a = dy, w = W,   down = s·v ⊙ B,      rscale = u, up = A;          writes dS = s·dy(v ⊙ B) (fp32),
          giving dx = dy W + (dS ⊙ u) A.

Each program owns one ``[BLOCK_M, BLOCK_N]`` tile of ``out``; its K loop loads the ``a`` tile once and feeds
two dots (``acc += a·w``, ``t += a·down``); the epilogue scales ``t`` by ``rscale``, casts it to the input
dtype and adds ``t·up`` to ``acc``. The N-tile-0 programs also store ``t`` in fp32 for the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import configs
from .common import as_operand, dot_precision, upcast_bf16

__all__ = ["fused_lora_mm"]


@triton.jit
def _fused_lora_mm_kernel(
    # pointers
    a_ptr,
    w_ptr,
    down_ptr,
    up_ptr,
    rscale_ptr,
    bias_ptr,
    out_ptr,
    t_ptr,
    # sizes
    M,
    N,
    K,
    R,
    # strides
    stride_am,
    stride_ak,
    stride_wk,
    stride_wn,
    stride_dk,
    stride_dr,
    stride_ur,
    stride_un,
    stride_om,
    stride_on,
    stride_tm,
    stride_tr,
    # compile-time switches and tiles
    HAS_RSCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_T: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped ordering: GROUP_M row tiles share the W column tiles they read while those are in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # int64 row/column offsets: M·K and N·K may pass 2³¹
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R

    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # [BLOCK_K, BLOCK_N]
    d_ptrs = down_ptr + offs_k[:, None] * stride_dk + offs_r[None, :] * stride_dr  # [BLOCK_K, BLOCK_R]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        mask_k = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        d = tl.load(d_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if UPCAST:  # interpreter only: its bf16 arithmetic is wrong, bf16 products are exact in fp32
            a = a.to(tl.float32)
            w = w.to(tl.float32)
            d = d.to(tl.float32)
        # acc += a·w (the base GEMM); t += a·down (the shrink), from the same a tile
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        t = tl.dot(a, d, t, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
        d_ptrs += BLOCK_K * stride_dk

    if WRITE_T:  # t in fp32 for the backward, once per row tile
        if pid_n == 0:
            t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
            tl.store(t_ptrs, t, mask=mask_m[:, None] & mask_r[None, :])
    if HAS_RSCALE:
        rscale = tl.load(rscale_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
        t = t * rscale[None, :]
    # acc += (t ⊙ rscale)·up: the rank-R expansion, t rounded to the input dtype as a dot operand
    up_ptrs = up_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un  # [BLOCK_R, BLOCK_N]
    up = tl.load(up_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    if UPCAST:
        up = up.to(tl.float32)
    acc = tl.dot(as_operand(t, up_ptr.dtype.element_ty, UPCAST), up, acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out = as_operand(acc, out_ptr.dtype.element_ty, UPCAST)
    tl.store(out_ptrs, out, mask=mask_m[:, None] & mask_n[None, :])


def fused_lora_mm(
    a: Tensor,
    w: Tensor,
    down: Tensor,
    up: Tensor,
    rscale: Tensor | None,
    bias: Tensor | None,
    *,
    write_t: bool,
    config: configs.FusedConfig | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``out [M, N] = a [M, K]·w [K, N] + ((a·down [K, R]) ⊙ rscale [R])·up [R, N] (+ bias [N])``; returns ``(out, t)``.

    ``a, w, down, up, bias`` share one dtype (any strides); ``rscale`` is float32 and contiguous; ``t = a·down``
    in float32 is returned when ``write_t``.
    """
    M, K = a.shape
    N, R = w.shape[1], down.shape[1]
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    t = torch.empty((M, R), device=a.device, dtype=torch.float32) if write_t else None
    if M == 0:
        return out, t
    block_r = configs.block_r_for(R)
    cfg = config or configs.fused_config(M, block_r, a.dtype, a.device)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _fused_lora_mm_kernel[grid](
        a,
        w,
        down,
        up,
        rscale if rscale is not None else a,  # never read when HAS_RSCALE is False
        bias if bias is not None else a,  # never read when HAS_BIAS is False
        out,
        t if t is not None else out,  # never written when WRITE_T is False
        M,
        N,
        K,
        R,
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        down.stride(0),
        down.stride(1),
        up.stride(0),
        up.stride(1),
        out.stride(0),
        out.stride(1),
        t.stride(0) if t is not None else 0,
        t.stride(1) if t is not None else 0,
        HAS_RSCALE=rscale is not None,
        HAS_BIAS=bias is not None,
        WRITE_T=write_t,
        UPCAST=upcast_bf16(a.dtype),
        PRECISION=dot_precision(a.dtype),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        BLOCK_R=block_r,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, t
