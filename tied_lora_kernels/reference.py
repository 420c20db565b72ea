"""The readable specification of Tied-LoRA: every kernel, test and benchmark is checked against this.

One adapted layer computes (design.md §1-§3)::

    y  = x Wᵀ + b + s · v ⊙ (B (u ⊙ (A x)))          x [..., K], W [N, K], b [N]
    ΔW = s · diag(v) · B · diag(u) · A               A [R, K], B [N, R], u [R], v [N]

``u`` or ``v`` may be ``None``, meaning a vector of ones. Nothing here is optimised: it is the math,
written the way the paper writes it, with an optional float64 upcast for parity tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["tied_lora_forward", "delta_weight"]


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

    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype)

    x, weight, bias, A, B, u, v = map(cast, (x, weight, bias, A, B, u, v))
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
