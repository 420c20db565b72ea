"""The readable specification of Tied-LoRA: every kernel, test and benchmark is checked against this.

One adapted layer computes (docs/design.md §1-§3)::

    y  = x Wᵀ + b + s · v ⊙ (B (u ⊙ (A x)))          x [..., K], W [N, K], b [N]
    ΔW = s · diag(v) · B · diag(u) · A               A [R, K], B [N, R], u [R], v [N]

``u`` or ``v`` may be ``None``, meaning a vector of ones. Nothing here is optimised: it is the math,
written the way the paper writes it, with an optional float64 upcast for parity tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["tied_lora_forward", "delta_weight", "dropout_keep"]


def tied_lora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    u: Tensor | None,
    v: Tensor | None,
    scale: float = 1.0,
    *,
    upcast: bool = False,
) -> Tensor:
    """``x Wᵀ + b + scale · (v ⊙ ((u ⊙ (x Aᵀ)) Bᵀ))`` on any leading dims of ``x``.

    With ``upcast=True`` every input is promoted to float64 and the result is float64 (the ground truth
    of the parity tests); otherwise the math runs in the inputs' dtype, adapters cast to ``x.dtype``.
    Differentiable with plain autograd.
    """
    dtype = torch.float64 if upcast else x.dtype

    x, weight, A, B = (t.to(dtype) for t in (x, weight, A, B))
    bias, u, v = (None if t is None else t.to(dtype) for t in (bias, u, v))
    t = x @ A.t()  # [..., R]     shrink: T = x Aᵀ
    if u is not None:
        t = t * u  # [..., R]     S = u ⊙ T
    delta = t @ B.t()  # [..., N]
    if v is not None:
        delta = delta * v
    y = x @ weight.t()  # [..., N]     base
    if bias is not None:
        y = y + bias
    return y + scale * delta


def delta_weight(A: Tensor, B: Tensor, u: Tensor | None, v: Tensor | None, scale: float = 1.0, *, dtype=None) -> Tensor:
    """``ΔW = scale · diag(v) · B · diag(u) · A`` as an ``[N, K]`` matrix (``dtype`` defaults to A's)."""
    dtype = dtype or A.dtype
    A, B = A.to(dtype), B.to(dtype)
    if u is not None:
        A = u.to(dtype)[:, None] * A  # diag(u) · A   [R, K]
    if v is not None:
        B = v.to(dtype)[:, None] * B  # diag(v) · B   [N, R]
    return scale * (B @ A)


def dropout_keep(seed: int, M: int, K: int, p: float) -> Tensor:
    """The keep mask ``[M, K]`` (bool) that the triton backend's adapter dropout draws from ``seed`` (see
    ``kernels/dropout.py``): entry ``(i, k)`` is kept when the top 31 bits of Philox4x32-10's output ``k mod 4``,
    for counter ``i·ceil(K/4) + k div 4`` and key ``seed``, are at least ``round(p · 2³¹)``. Plain int64 PyTorch,
    for tests and for reproducing a training run's mask on any device."""
    groups = -(-K // 4)
    counter = torch.arange(M, dtype=torch.int64)[:, None] * groups + torch.arange(groups, dtype=torch.int64)[None, :]
    zero = torch.zeros_like(counter)
    draws = torch.stack(_philox4x32_10(counter & 0xFFFFFFFF, counter >> 32, zero, zero, seed), dim=-1)
    draws = draws.reshape(M, groups * 4)[:, :K]  # output j of group g is column 4g + j
    return (draws >> 1) >= round(p * 2**31)


def _philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, key: int) -> list[Tensor]:
    """Philox4x32-10 (Salmon et al., SC'11; Random123's ``philox4x32``) of 32-bit counters held in int64, keyed by
    a 64-bit ``key`` (low half first), as ``triton.language.random.philox_impl`` runs it."""
    lo32 = 0xFFFFFFFF
    c, k0, k1 = [c0, c1, c2, c3], key & lo32, (key >> 32) & lo32
    for _ in range(10):
        hi_b, lo_b = _mul32(0xCD9E8D57, c[2])
        hi_a, lo_a = _mul32(0xD2511F53, c[0])
        c = [hi_b ^ c[1] ^ k0, lo_b, hi_a ^ c[3] ^ k1, lo_a]
        k0, k1 = (k0 + 0x9E3779B9) & lo32, (k1 + 0xBB67AE85) & lo32
    return c


def _mul32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """The high and low 32 bits of ``a · b`` (``a`` and ``b`` < 2³²) in int64 arithmetic, from 16-bit halves."""
    a_hi, a_lo, b_hi, b_lo = a >> 16, a & 0xFFFF, b >> 16, b & 0xFFFF
    low, mid = a_lo * b_lo, a_hi * b_lo + a_lo * b_hi  # < 2³², < 2³³
    low = low + ((mid & 0xFFFF) << 16)  # < 2³³
    return (a_hi * b_hi + (mid >> 16) + (low >> 32)) & 0xFFFFFFFF, low & 0xFFFFFFFF
