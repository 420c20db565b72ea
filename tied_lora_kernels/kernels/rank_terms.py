"""The rank-R term added to an output tile, ``acc + ((t ⊙ rscale)·(up ⊙ scale·cscale))``: the epilogue of the fused
GEMM (``forward.py``) and of the split-K sum that adds the rank-R term apart (``split_sum.py``). Each rank tile of
``up`` is rounded to the input dtype after it is scaled in fp32, and ``t`` (fp32) as the dot operand; at fp32 with
exact dots a 128-rank tile runs as two 64-rank dots, and a split-K partial ``t`` can go in as a hi + lo pair.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import as_operand


@triton.jit
def _add_rank_update(
    acc,
    t,
    rscale_ptr,
    up_ptr,
    cscale_ptr,
    scale,
    offs_r,
    offs_n,
    mask_r,
    mask_n,
    stride_ur,
    stride_un,
    DTYPE: tl.constexpr,
    HAS_RSCALE: tl.constexpr,
    FOLD_UP: tl.constexpr,
    HAS_CSCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    T_HI_LO: tl.constexpr,
):
    """``acc + (t ⊙ rscale)·(up ⊙ scale·cscale)``: the rank-R expansion, ``t`` and the scaled ``up`` rounded to
    the input dtype ``DTYPE`` as dot operands. Without ``FOLD_UP`` (``up`` already in ``DTYPE``, scale 1, no
    ``cscale``: the prefill forward's host-folded ``s·v ⊙ B``) the tile is used as loaded.

    ``T_HI_LO`` (split-K one-pass, where ``t`` is one K slice's partial): ``t`` goes in as two input-dtype
    terms, ``hi = round(t)`` and ``lo = round(t - hi)``, and two tensor-core dots, so each partial keeps ~16
    significant bits (bf16) before the slices are summed in fp32; rounding each partial once would lose what
    cancels between them. (One fp32 dot instead spilled registers at ranks 64 and 128.) In fp16, whose range
    ends at 65504, each row of ``t`` is first scaled by a power of two that brings it under 2^15 (none for
    rows already there) and its product scaled back in fp32, so a partial beyond fp16's range stays finite
    where the slices' partials cancel (the unsplit kernel rounds the complete ``t``, finite there too). A row's
    entries far smaller than its largest (by more than fp16's dynamic range, ~2^30) become subnormal or zero
    once scaled: only where huge partials cancel exactly do they matter, and the unsplit kernel keeps them.

    Exact fp32 (CUDA-core dots) at a 128-rank tile goes as two dots over 64 ranks each, the same multiply-adds in
    the same order. One dot over all 128 held each thread's 128 ``t`` and ``up`` operands at once and, in a layer
    without ``u``, spilled 136-192 bytes at 255 registers on triton 3.6 with every tile tried; the halves compile
    clean on triton 3.6 and 3.9 with every bias/u/v switch.
    """
    if HAS_RSCALE:
        rscale = tl.load(rscale_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
        t = t * rscale[None, :]
    if DTYPE == tl.float32 and PRECISION == "ieee" and t.shape[1] == 128:  # (T_HI_LO: 16-bit only)
        BM: tl.constexpr = t.shape[0]
        H: tl.constexpr = t.shape[1] // 2
        t0, t1 = tl.split(tl.permute(tl.reshape(t, (BM, 2, H)), (0, 2, 1)))  # ranks 0..63, 64..127
        r0, r1 = tl.split(tl.permute(tl.reshape(offs_r, (2, H)), (1, 0)))
        m0, m1 = tl.split(tl.permute(tl.reshape(mask_r, (2, H)), (1, 0)))
        acc = _add_rank_dot(
            acc, t0, up_ptr, cscale_ptr, scale, r0, offs_n, m0, mask_n, stride_ur, stride_un, DTYPE, FOLD_UP,
            HAS_CSCALE, UPCAST, PRECISION, T_HI_LO,
        )  # fmt: skip
        t, offs_r, mask_r = t1, r1, m1
    return _add_rank_dot(
        acc, t, up_ptr, cscale_ptr, scale, offs_r, offs_n, mask_r, mask_n, stride_ur, stride_un, DTYPE, FOLD_UP,
        HAS_CSCALE, UPCAST, PRECISION, T_HI_LO,
    )  # fmt: skip


@triton.jit
def _add_rank_dot(
    acc,
    t,
    up_ptr,
    cscale_ptr,
    scale,
    offs_r,
    offs_n,
    mask_r,
    mask_n,
    stride_ur,
    stride_un,
    DTYPE: tl.constexpr,
    FOLD_UP: tl.constexpr,
    HAS_CSCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    T_HI_LO: tl.constexpr,
):
    """``acc + t·(up ⊙ scale·cscale)`` over the ranks ``offs_r``: ``_add_rank_update`` after ``rscale``."""
    up_ptrs = up_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un  # [BLOCK_R, BLOCK_N]
    up = tl.load(up_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    if FOLD_UP:  # up ⊙ (scale·cscale) in fp32, rounded once (the host's (s·v ⊙ B).to(dtype), same operations)
        up = up.to(tl.float32)
        if HAS_CSCALE:
            cscale = tl.load(cscale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            up = up * (scale * cscale)[None, :]
        else:
            up = up * scale
        up = as_operand(up, DTYPE, UPCAST)
    elif UPCAST:
        up = up.to(tl.float32)
    if T_HI_LO and DTYPE == tl.float16:
        # fp16's range: each row of t is scaled by 2^-e (exact), e ≥ 0 the least that brings its largest entry
        # under 2^15, and the row's product scaled back by 2^e in fp32 (exact): a partial beyond 65504 stays
        # finite, and rows under 2^15 (e = 0) are used as they are
        big = tl.max(tl.abs(t), axis=1).to(tl.int32, bitcast=True)
        e = tl.maximum(((big >> 23) & 0xFF) - (127 + 14), 0)  # |t| < 2^(field - 126), field the fp32 exponent
        t = t * ((127 - e) << 23).to(tl.float32, bitcast=True)[:, None]
        hi = as_operand(t, DTYPE, UPCAST)
        lo = as_operand(t - hi.to(tl.float32), DTYPE, UPCAST)
        rank = tl.dot(hi, up, input_precision=PRECISION)
        rank = tl.dot(lo, up, rank, input_precision=PRECISION)
        acc += rank * ((127 + e) << 23).to(tl.float32, bitcast=True)[:, None]
    else:
        hi = as_operand(t, DTYPE, UPCAST)
        acc = tl.dot(hi, up, acc, input_precision=PRECISION)
        if T_HI_LO:
            lo = as_operand(t - hi.to(tl.float32), DTYPE, UPCAST)
            acc = tl.dot(lo, up, acc, input_precision=PRECISION)
    return acc
