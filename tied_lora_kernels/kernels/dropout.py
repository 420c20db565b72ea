"""Adapter dropout in the fused kernels: one mask, drawn once per forward, stored as bits for the backward.

Dropout acts on the adapter's input only (PEFT's ``lora_dropout``): with keep mask ``m [M, K]`` and
``c = 1 / (1 - p)``::

    y  = x Wᵀ + b + s · (v ⊙ ((u ⊙ (c · (m ⊙ x) Aᵀ)) Bᵀ))      T = c · (m ⊙ x) Aᵀ
    dx = dy W + c · m ⊙ (dT A)                                  dA = c · dTᵀ (m ⊙ x)

so the three kernels that touch it are the forward's shrink (``T``: it draws ``m`` and stores it), the dx
GEMM (its rank-R term masked per output entry) and the ``dA`` reduction (its ``x`` tiles masked); ``dB``,
``du``, ``dv`` and ``dW`` see ``T`` and ``x`` as they are. A dropout forward therefore runs two-pass (the
shrink draws the mask once; one-pass would redraw it in every column tile of the GEMM).

The mask is a function of a seed and the entry's position only: ``m[i, k]`` keeps entry ``(i, k)`` when
the top 31 bits of Philox4x32-10 output ``k mod 4`` for counter ``i·ceil(K/4) + k div 4`` (triton's
``randint4x``, one call for four entries), keyed by the seed, are at least ``round(p · 2³¹)``. The seed is
drawn from ``x``'s device generator (``torch.randint``: a CUDA graph replays it as a fresh draw, and
``torch.utils.checkpoint`` restores it before recomputing), so ``torch.manual_seed`` fixes the mask (one seed
gives one mask on any device; CPU and CUDA generators draw different seeds); ``reference.dropout_keep``
recomputes it in plain PyTorch. Under ``torch.compile`` the draw is traced into the graph, outside the custom
op, which takes the seed as an input: two identical calls in one graph then differ in their seeds, and a
checkpointed region that the graph recomputes for the backward reuses the forward's seed. (A draw inside the
opaque op let the graph's common-subexpression pass merge two calls into one mask, and the recomputation draw
a new mask, so the backward's gradients belonged to another mask than the forward's ``y``.) Inductor draws the
seed with its own generator. The torch backend draws with ``F.dropout`` instead: the two backends drop with
the same probability, not the same entries.

The mask travels as ``bits [M, ceil(K/8)]`` uint8, bit ``k mod 8`` of byte ``k div 8`` (M·K/8 bytes, an
eighth of an fp8 copy of ``x``), saved for the backward instead of the seed: reading it is cheaper than
drawing it again (a draw is ~25 integer operations an entry) and it needs no ``x``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import cdiv

__all__ = ["DropoutMask", "new_mask", "draw_seed", "keep_threshold"]


@triton.jit
def draw_keep(seed, offs_m, k0, K, threshold, BLOCK_K: tl.constexpr):
    """The keep mask of rows ``offs_m`` (int64) and columns ``[k0, k0 + BLOCK_K)`` (``k0`` a multiple of 4):
    ``[len(offs_m), BLOCK_K]`` bool, four entries per Philox call (module docstring)."""
    groups = tl.cdiv(K, 4)
    counter = offs_m[:, None] * groups + (k0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    # columns 4g + j take output j: join(join(r0, r2), join(r1, r3)) reshapes to r0 r1 r2 r3 along each row
    r = tl.join(tl.join(r0 >> 1, r2 >> 1), tl.join(r1 >> 1, r3 >> 1))
    r = tl.reshape(r, (offs_m.shape[0], BLOCK_K)).to(tl.int32)  # (31-bit values: the cast keeps them)
    return r >= threshold


@triton.jit
def pack_bits(keep, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``keep [BLOCK_M, BLOCK_K]`` as bytes ``[BLOCK_M, BLOCK_K // 8]``:
    column ``8j + b`` is bit ``b`` of byte ``j``."""
    bits = tl.reshape(keep.to(tl.int32), (BLOCK_M, BLOCK_K // 8, 8)) << tl.arange(0, 8)[None, None, :]
    return tl.sum(bits, axis=2).to(tl.uint8)


@triton.jit
def load_keep(bits_ptr, stride_bm, offs_m, mask_m, k0, K, BLOCK_K: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The stored keep mask of rows ``offs_m`` and columns ``[k0, k0 + BLOCK_K)`` (``k0`` a multiple of 8):
    ``[len(offs_m), BLOCK_K]`` bool, or ``[BLOCK_K, len(offs_m)]`` when ``TRANSPOSED``. Loads the tile's bytes
    ``[M, BLOCK_K // 8]`` (an eighth of its entries: a gather of one byte per entry spilled registers) and expands
    their bits to ``[M, BLOCK_K // 8, 8]``, then ``[M, BLOCK_K]``; transposed last (expanding along the other
    dimension spilled 32 bytes for sm_100 with triton 3.6)."""
    offs_byte = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    byte_ptrs = bits_ptr + offs_m[:, None] * stride_bm + offs_byte[None, :]
    byte = tl.load(byte_ptrs, mask=mask_m[:, None] & (offs_byte < tl.cdiv(K, 8))[None, :], other=0).to(tl.int32)
    bits = tl.reshape((byte[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1, (offs_m.shape[0], BLOCK_K))
    if TRANSPOSED:
        bits = tl.trans(bits.to(tl.int8))
    return bits != 0


class DropoutMask(NamedTuple):
    """One forward's dropout: probability ``p``, the ``seed`` it draws with (int64 ``[1]`` on the device) and
    the ``bits`` the shrink writes (uint8 ``[M, ceil(K/8)]``; None when no backward will read them)."""

    p: float
    seed: Tensor | None  # (None in the backward, which reads the bits)
    bits: Tensor | None

    @property
    def scale(self) -> float:
        """``1 / (1 - p)``: what a kept entry is multiplied by."""
        return 1.0 / (1.0 - self.p)

    def kept_bits(self) -> Tensor:
        """``bits``, for a launch that reads the mask back (a backward's); an error if the draw was not kept."""
        if self.bits is None:
            raise RuntimeError("this dropout mask was drawn without keeping its bits: no backward can read it")
        return self.bits


def new_mask(
    p: float, M: int, K: int, device: torch.device, seed: Tensor | None = None, *, keep: bool = True
) -> DropoutMask:
    """A mask to draw for ``x [M, K]`` from ``seed`` (None: a fresh one, ``draw_seed``), bits not yet written
    (``keep=False``: none, the draw is not kept)."""
    bits = torch.empty((M, cdiv(K, 8)), device=device, dtype=torch.uint8) if keep else None
    return DropoutMask(float(p), draw_seed(device) if seed is None else seed, bits)


def draw_seed(device: torch.device) -> Tensor:
    """A dropout seed, int64 ``[1]`` on ``device``, from its default generator (one draw per forward)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def keep_threshold(p: float) -> int:
    """The 31-bit threshold an entry's draw must reach to be kept: ``round(p · 2³¹)`` (2³¹, dropping every entry,
    only for ``p > 1 - 2⁻³²``; 0, keeping every entry, for ``p < 2⁻³²``: the keep rate is ``1 - p`` within 2⁻³²)."""
    return round(p * 2**31)
