"""The autograd Function joining the fused kernels, and ``tied_lora_linear_triton`` (the triton backend)."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import configs
from .backward import rank_grad
from .forward import fused_lora_mm
from .shrink import shrink

__all__ = ["TiedLoRALinearFunction", "tied_lora_linear_triton", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tied_lora_linear_triton(
    x2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    u: Tensor | None,
    v: Tensor | None,
    scale: float,
    *,
    deterministic: bool,
) -> Tensor:
    """``y [M, N] = x Wᵀ + b + scale · (v ⊙ ((u ⊙ (x Aᵀ)) Bᵀ))`` with the fused kernels (inputs pre-checked).

    Shapes as in ``functional.tied_lora_linear`` with ``x2d [M, K]``. Adds the checks only triton needs:
    the input dtype and the largest supported rank.
    """
    if x2d.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"backend='triton' supports float16, bfloat16 and float32 inputs, got {x2d.dtype}; "
            "use backend='torch' for other dtypes"
        )
    rank = A.shape[0]
    if rank > configs.MAX_RANK:
        raise ValueError(
            f"backend='triton' supports ranks up to {configs.MAX_RANK}, got rank {rank}; use backend='torch'"
        )
    # grad mode is off inside Function.forward, so whether a backward can follow is decided here
    keep_t = torch.is_grad_enabled()
    return TiedLoRALinearFunction.apply(x2d, weight, bias, A, B, u, v, float(scale), bool(deterministic), keep_t)


def _scaled_b(B: Tensor, v: Tensor | None, scale: float, dtype: torch.dtype) -> Tensor:
    """``s · v ⊙ B`` as ``[N, R]`` in ``dtype``, rounded once from fp32 (design.md §7: fold s·v on the host);
    at decode the forward's kernel does the same from the master weights instead.

    A view whose row stride is padded to a multiple of 16 elements: the JIT then specialises the kernels on
    an aligned stride (what ``compile_check`` assumes), which saves ~90 registers in the dx kernel at R = 128.
    """
    N, R = B.shape
    out = torch.empty((N, -(-R // 16) * 16), device=B.device, dtype=dtype)[:, :R]
    factor = scale if v is None else (scale * v.float())[:, None]
    return torch.mul(B.float(), factor, out=out)  # computed in fp32, rounded to dtype as it is stored


def _on_device(t: Tensor):
    """Launch on ``t``'s GPU and its current stream, whatever the current device (triton uses the latter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


class TiedLoRALinearFunction(torch.autograd.Function):
    """Tied-LoRA linear on ``x [M, K]`` with the fused Triton kernels (design.md §3-§4).

    Forward, with ``T = x Aᵀ [M, R]`` and ``S = u ⊙ T`` (``u``, ``v`` = ones when None)::

        y  = x Wᵀ + b + s · (S Bᵀ) ⊙ v                        [M, N]   the fused GEMM; saves T (fp32)

    Backward, given ``dy [M, N]``::

        dS = s · dy (v ⊙ B)              [M, R]   fp32, written by the dx kernel (two-pass: by the shrink)
        dT = dS ⊙ u                      [M, R]
        dx = dy W + dT A                 [M, K]   the forward kernel again
        G  = dyᵀ S                       [N, R]   one pass over dy (rank_grad)
        dB = s · v[:, None] ⊙ G          [N, R]
        dv = s · rowsum(B ⊙ G)           [N]
        du = colsum(dS ⊙ T)              [R]
        dA = dTᵀ x                       [R, K]   (rank_grad)
        dW = dyᵀ x                       [N, K]   (torch matmul, only if W trains)
        db = colsum(dy)                  [N]      (only if b trains)

    The fused GEMM is one-pass (``T`` accumulated in its K loop) or two-pass (``T``, resp. ``dS``, written
    first by the shrink kernel), chosen per shape by ``configs.strategy_for``; at decode it may split K.

    Saved for backward: ``T`` in fp32 only when ``B``, ``u`` or ``v`` trains, ``x`` only when ``A`` or ``W``
    trains; the parameters themselves (no casts or copies of them). Work for a frozen input is skipped.
    ``dA``, ``dB``, ``du``, ``dv`` are fp32 per-layer partials returned in the parameter's dtype: with float32
    master adapters autograd sums the partials of tied layers in fp32, in place, and fires each hook once.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, u, v, scale, deterministic, grad_enabled):
        with _on_device(x):
            return TiedLoRALinearFunction._forward(ctx, x, weight, bias, A, B, u, v, scale, deterministic, grad_enabled)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        with _on_device(dy):
            return TiedLoRALinearFunction._backward(ctx, dy)

    @staticmethod
    def _forward(ctx, x, weight, bias, A, B, u, v, scale, deterministic, grad_enabled):
        needs_x, needs_w, _, needs_a, needs_b, needs_u, needs_v = ctx.needs_input_grad[:7]
        dtype = x.dtype
        # no T without a backward to use it (needs_input_grad stays True under no_grad)
        keep_t = grad_enabled and (needs_b or needs_u or needs_v)
        if bias is not None:
            bias = bias.contiguous()  # the kernel reads bias with unit stride
        # y = x·Wᵀ + ((x·Aᵀ) ⊙ u)·(Bᵀ ⊙ s·v) + b, T = x·Aᵀ in fp32. At decode the kernel reads the master A
        # and B and folds s·v itself (four launches fewer, which cost more than the GEMM there); prefill casts
        # them here, amortised over a long GEMM, into s·v ⊙ B with a 16-aligned row stride (see _scaled_b)
        # a forced strategy / split (configs.forced, TIED_LORA_STRATEGY) holds for the backward too
        strategy, split_k = configs.forced_choice()
        if configs.regime_of(x.shape[0]) == "decode":  # adapters are fp32 or x's dtype (functional.py)
            down, up, fold = A.t(), B.t(), dict(scale=scale, cscale=_f32(v))
        else:
            down, up, fold = A.to(dtype).t(), _scaled_b(B, v, scale, dtype).t(), {}
        y, T = fused_lora_mm(
            x, weight.t(), down, up, _f32(u), bias, **fold, write_t=keep_t, strategy=strategy, split_k=split_k
        )
        ctx.save_for_backward(x if (needs_a or needs_w) else None, T, weight, A, B, u, v)
        ctx.scale = scale
        ctx.deterministic = deterministic
        ctx.forced = dict(strategy=strategy, split_k=split_k)
        return y

    @staticmethod
    def _backward(ctx, dy):
        x, T, weight, A, B, u, v = ctx.saved_tensors
        needs_x, needs_w, needs_bias, needs_a, needs_b, needs_u, needs_v = ctx.needs_input_grad[:7]
        s, det, dtype = ctx.scale, ctx.deterministic, dy.dtype
        dx = dw = dbias = dA = dB = du = dv = None
        u32 = _f32(u)
        need_ds = needs_a or needs_u

        dS = None
        if needs_x or need_ds:
            svB = _scaled_b(B, v, s, dtype)  # [N, R]
            if needs_x:
                # dx = dy·W + ((dy·svB) ⊙ u)·A, dS = dy·svB in fp32 from the same kernel
                dx, dS = fused_lora_mm(dy, weight, svB, A, u32, None, write_t=need_ds, **ctx.forced)
            else:
                dS = shrink(dy, svB)  # dS = s·dy(v ⊙ B) in fp32, dx not needed
        if needs_a:
            # dA = (dS ⊙ u)ᵀ x   [R, K], fp32
            dA = rank_grad(x, dS, u32, deterministic=det, transpose_out=True).to(A.dtype)
        if needs_u:
            du = (dS * T).sum(0).to(u.dtype)  # du = colsum(dS ⊙ T)
        if needs_b or needs_v:
            G = rank_grad(dy, T, u32, deterministic=det)  # G = dyᵀ (T ⊙ u)   [N, R], fp32
            if needs_b:
                dB = (G * s if v is None else G * (s * v.float())[:, None]).to(B.dtype)
            if needs_v:
                dv = (s * (B.float() * G).sum(1)).to(v.dtype)
        if needs_w:
            dw = dy.t().mm(x)  # dW = dyᵀ x   [N, K]
        if needs_bias:
            dbias = dy.sum(0)  # db = colsum(dy)   [N]
        # x, weight, bias, A, B, u, v, scale, deterministic, grad_enabled
        return dx, dw, dbias, dA, dB, du, dv, None, None, None
