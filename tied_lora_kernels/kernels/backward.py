"""The rank-gradient reduction over tokens (docs/design.md §4) and its launcher.

    acc [C, R] = Σ_m a[m, c] · p[m, r]            a [M, C] (input dtype), p [M, R] (fp32, rounded as dot operand)
    out [C, R] = scale · ovec[c] · acc[c, r] · rscale[r]

Backward runs it twice: ``dAᵀ = xᵀ (dS ⊙ u)`` (a = x, p = dS / s = dy (v ⊙ B), rscale = u, scale = s) and
``dB = s·v ⊙ G`` with
``G = dyᵀ (T ⊙ u)`` (a = dy, p = T, rscale = u, ovec = v; one pass over dy). With ``rowmat = B`` the second
also finishes, in its epilogue,

    rowdot [C] = scale · rowsum(rowmat ⊙ acc ⊙ rscale)          dv = s · rowsum(B ⊙ G)
    coldot [R] = colsum(scale · ovec ⊙ rowmat ⊙ acc)            du = colsum(dS ⊙ T) = colsum((s·v ⊙ B) ⊙ dyᵀT)

(the last because ``dS = dy (s·v ⊙ B)``: ``Σ_m dS[m, r] T[m, r] = Σ_n (s·v ⊙ B)[n, r] (dyᵀ T)[n, r]``), so the
backward's small gradients cost no launches of their own — each would be a few microseconds on a GPU for a
few kilobytes — and ``du`` needs no ``dS``. ``rscale`` is applied in the epilogue (``p`` enters the dot as
loaded). Everything is linear in the token slices, so each program finishes its partial before combining it.
With adapter dropout (``DROPOUT``, ``dA`` only: ``dA = c · dTᵀ (m ⊙ x)``, ``dropout.py``) each ``a`` tile is
masked by the keep bits the forward stored, and ``scale = c = 1 / (1 - p)``.
Each program owns ``BLOCK_C`` rows of ``acc`` and one of ``SPLIT`` interleaved slices of the tokens. Two ways
to combine the partials:

- ``deterministic=False``: fp32 ``atomic_add`` into one zeroed buffer (fast, summation order varies; the
  backward hands both reductions segments of one buffer, zeroed once: ``workspace``);
- ``deterministic=True``: each program stores its fp32 partials in its own row of a buffer, summed
  afterwards in a fixed order — bitwise-identical results across runs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import configs
from .common import FP_FUSION, as_operand, cdiv, dot_precision, upcast_bf16
from .dropout import DropoutMask, load_keep

__all__ = ["rank_grad", "rank_grad_numel", "RankGrads"]


@triton.jit
def _rank_grad_kernel(
    # pointers
    a_ptr,
    p_ptr,
    rscale_ptr,
    ovec_ptr,
    rowmat_ptr,
    out_ptr,
    rowdot_ptr,
    coldot_ptr,
    bits_ptr,
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
    stride_bc,
    stride_br,
    stride_os,
    stride_oc,
    stride_or,
    stride_ds,
    stride_cs,
    stride_cc,
    stride_bm,
    # scalars
    scale,
    # compile-time switches and tiles
    HAS_RSCALE: tl.constexpr,
    HAS_OVEC: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    ROWDOT: tl.constexpr,
    COLDOT: tl.constexpr,
    USE_ATOMIC: tl.constexpr,
    DROPOUT: tl.constexpr,
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

    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    # token tiles pid_s, pid_s + SPLIT, pid_s + 2·SPLIT, ...
    for m0 in range(pid_s * BLOCK_M, M, SPLIT * BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < M
        a_ptrs = a_ptr + offs_m[None, :] * stride_am + offs_c[:, None] * stride_ac  # [BLOCK_C, BLOCK_M] = aᵀ
        p_ptrs = p_ptr + offs_m[:, None] * stride_pm + offs_r[None, :] * stride_pr  # [BLOCK_M, BLOCK_R]
        mask_a = mask_c[:, None] & mask_m[None, :]
        if DROPOUT:  # a = x: the entries the forward dropped load as zeros (a_t's rows are x's columns)
            mask_a = mask_a & load_keep(bits_ptr, stride_bm, offs_m, mask_m, pid_c * BLOCK_C, C, BLOCK_C, True)
        a_t = tl.load(a_ptrs, mask=mask_a, other=0.0)
        p = tl.load(p_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if UPCAST:  # interpreter only (see common.py)
            a_t = a_t.to(tl.float32)
        # acc += aᵀ·p, p rounded to the input dtype as a dot operand
        acc = tl.dot(a_t, as_operand(p, a_ptr.dtype.element_ty, UPCAST), acc, input_precision=PRECISION)

    # the epilogue: this program's partials of coldot (from acc), then of rowdot and out (from G = acc ⊙ rscale)
    mask = mask_c[:, None] & mask_r[None, :]
    if HAS_OVEC:  # scale·ovec first, as the host computes s·v
        cscale = scale * tl.load(ovec_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    else:
        cscale = tl.full((BLOCK_C,), scale, tl.float32)
    if ROWDOT or COLDOT:
        rows = tl.load(rowmat_ptr + offs_c[:, None] * stride_bc + offs_r[None, :] * stride_br, mask=mask, other=0.0)
        rows = rows.to(tl.float32)
        if COLDOT:  # colsum(cscale ⊙ rowmat ⊙ acc) over this program's rows
            col = tl.sum((rows * cscale[:, None]) * acc, axis=0)
            _combine(coldot_ptr + pid_s * stride_cs + pid_c * stride_cc + offs_r, col, mask_r, USE_ATOMIC)
    if HAS_RSCALE:  # acc becomes G
        acc = acc * tl.load(rscale_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    if ROWDOT:  # scale · rowsum(rowmat ⊙ G)
        _combine(rowdot_ptr + pid_s * stride_ds + offs_c, scale * tl.sum(rows * acc, axis=1), mask_c, USE_ATOMIC)
    if WRITE_OUT:
        out_ptrs = out_ptr + pid_s * stride_os + offs_c[:, None] * stride_oc + offs_r[None, :] * stride_or
        _combine(out_ptrs, acc * cscale[:, None], mask, USE_ATOMIC)


@triton.jit
def _combine(ptrs, value, mask, USE_ATOMIC: tl.constexpr):
    """Add this program's fp32 partial into a zeroed output (atomics), or store it in its slice's row."""
    if USE_ATOMIC:
        # relaxed: nothing reads the output until the kernel has finished, so no ordering between programs
        tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, value, mask=mask)


class RankGrads(NamedTuple):
    """fp32 results of ``rank_grad`` (None where not asked for)."""

    out: Tensor | None = None
    rowdot: Tensor | None = None
    coldot: Tensor | None = None


def _result_shapes(C, R, *, write_out, transpose_out, rowdot, coldot) -> dict[str, tuple[int, ...]]:
    """The shapes of ``rank_grad``'s results, in the order they lie in its buffer."""
    shapes: dict[str, tuple[int, ...]] = {"out": (R, C) if transpose_out else (C, R)} if write_out else {}
    if rowdot:
        shapes["rowdot"] = (C,)
    if coldot:
        shapes["coldot"] = (R,)
    return shapes


def rank_grad_numel(C: int, R: int, *, write_out: bool = True, rowdot: bool = False, coldot: bool = False) -> int:
    """Elements of the ``workspace`` of a ``rank_grad`` with atomics on ``a [M, C]``, ``p [M, R]``."""
    shapes = _result_shapes(C, R, write_out=write_out, transpose_out=False, rowdot=rowdot, coldot=coldot)
    return sum(math.prod(shape) for shape in shapes.values())


def rank_grad(
    a: Tensor,
    p: Tensor,
    rscale: Tensor | None,
    *,
    deterministic: bool,
    write_out: bool = True,
    transpose_out: bool = False,
    scale: float = 1.0,
    ovec: Tensor | None = None,
    rowmat: Tensor | None = None,
    rowdot: bool = False,
    coldot: bool = False,
    config: configs.RankGradConfig | None = None,
    workspace: Tensor | None = None,
    dropout: DropoutMask | None = None,
) -> RankGrads:
    """From ``acc = aᵀ p`` ``[C, R]`` and ``G = acc ⊙ rscale``: ``out = scale · ovec ⊙ G`` (``[R, C]`` contiguous
    when ``transpose_out``; only when ``write_out``), ``rowdot = scale · rowsum(rowmat ⊙ G)`` ``[C]`` and
    ``coldot = colsum(scale · ovec ⊙ rowmat ⊙ acc)`` ``[R]`` when asked for: fp32, from one launch (plus a
    zeroing or, when ``deterministic``, the sum of the partials).

    ``a [M, C]`` in the input dtype (any strides); ``p [M, R]`` float32, ``rscale [R]`` and ``ovec [C]``
    float32 (``None``: ones; a strided one is copied first); ``rowmat [C, R]`` any float dtype and strides
    (needed by ``rowdot`` and ``coldot``). ``workspace``: with atomics only, a zeroed flat fp32 tensor of
    ``rank_grad_numel`` elements to add into instead of zeroing a buffer of its own, so that several calls
    share one zeroing (and their results may share storage). ``dropout``: ``a`` is the forward's ``x``, masked
    by the bits its shrink stored (the caller passes ``scale = 1 / (1 - p)``).
    """
    M, C = a.shape
    R = p.shape[1]
    # the kernel reads the vectors with unit stride (free when they have one)
    rscale = rscale.contiguous() if rscale is not None else None
    ovec = ovec.contiguous() if ovec is not None else None
    if (rowdot or coldot) and rowmat is None:
        raise ValueError("rowdot and coldot need rowmat")
    results = _result_shapes(C, R, write_out=write_out, transpose_out=transpose_out, rowdot=rowdot, coldot=coldot)
    if workspace is not None and (deterministic or workspace.numel() != sum(map(math.prod, results.values()))):
        raise ValueError("a workspace is for atomics only (deterministic=False) and has rank_grad_numel elements")
    if M == 0 or C == 0 or not results:  # (C = 0: a layer of no input or output features, nothing to reduce)
        return RankGrads(**{k: a.new_zeros(shape, dtype=torch.float32) for k, shape in results.items()})
    block_r = configs.block_r_for(R)
    cfg = config or configs.rank_grad_config(block_r, a.dtype, a.device)
    num_c = cdiv(C, cfg.block_c)
    num_m = cdiv(M, cfg.block_m)
    # from the shapes and the GPU only: the same split (and summation order) on every run on one kind of GPU
    split = max(1, min(num_m, configs.target_programs(a.device) // num_c))
    # every result is a segment of one buffer: one zeroing (atomics) or one sum over the slices
    # (deterministic; coldot then has a row per program, summed once more)
    sizes = {k: math.prod(shape) for k, shape in results.items()}
    if coldot and deterministic:
        sizes["coldot"] = num_c * R
    total = sum(sizes.values())
    if deterministic:
        buf = torch.empty((split, total), device=a.device, dtype=torch.float32)
    elif workspace is not None:
        buf = workspace.view(1, total)
    else:
        buf = torch.zeros((1, total), device=a.device, dtype=torch.float32)
    parts = dict(zip(sizes, buf.split_with_sizes(list(sizes.values()), dim=1), strict=True))
    stride_oc, stride_or = (1, C) if transpose_out else (R, 1)
    stride_split = buf.stride(0) if deterministic else 0
    dummy = buf  # never touched when its switch is off
    bits = dropout.kept_bits() if dropout is not None else None
    _rank_grad_kernel[(num_c, split)](
        a,
        p,
        rscale if rscale is not None else dummy,
        ovec if ovec is not None else dummy,
        rowmat if rowmat is not None else dummy,
        parts.get("out", dummy),
        parts.get("rowdot", dummy),
        parts.get("coldot", dummy),
        bits if bits is not None else dummy,
        M,
        C,
        R,
        split,
        *a.stride(),
        *p.stride(),
        *(rowmat.stride() if rowmat is not None else (0, 0)),
        stride_split,
        stride_oc,
        stride_or,
        stride_split,
        stride_split,
        R if deterministic else 0,
        bits.stride(0) if bits is not None else 0,
        float(scale),
        HAS_RSCALE=rscale is not None,
        HAS_OVEC=ovec is not None,
        WRITE_OUT=write_out,
        ROWDOT=rowdot,
        COLDOT=coldot,
        USE_ATOMIC=not deterministic,
        DROPOUT=dropout is not None,
        UPCAST=upcast_bf16(a.dtype),
        PRECISION=dot_precision(a.dtype),
        BLOCK_C=cfg.block_c,
        BLOCK_M=cfg.block_m,
        BLOCK_R=block_r,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        enable_fp_fusion=FP_FUSION,
    )
    summed = buf.sum(0) if deterministic else buf[0]
    done = dict(zip(sizes, summed.split_with_sizes(list(sizes.values())), strict=True))
    if coldot and deterministic:
        done["coldot"] = done["coldot"].view(num_c, R).sum(0)
    return RankGrads(**{k: done[k].view(shape) for k, shape in results.items()})
