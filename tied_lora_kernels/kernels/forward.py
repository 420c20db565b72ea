"""The fused GEMM (docs/design.md §3) and its launcher: forward ``y`` and backward ``dx`` both run it.

    out = a·w + ((a·down) ⊙ rscale)·(up ⊙ scale·cscale) (+ bias)
          a [M, K], w [K, N], down [K, R], up [R, N], rscale [R], cscale [N] (per column of up), scale a float

Forward:  a = x,  w = Wᵀ, down = Aᵀ,     rscale = u, up = Bᵀ, cscale = v, scale = s; returns T = x Aᵀ (fp32).
Backward: a = dy, w = W,  down = v ⊙ B,   rscale = s·u, up = A;                      returns dS / s = dy(v ⊙ B)
          (fp32), giving dx = dy W + (dS ⊙ u) A (s applied in fp32: s·v ⊙ B rounded to fp16 can fall
          below its normal range).

``down`` and ``up`` may be stored in fp32 (the adapters' master weights; ``down`` in one-pass only): each tile
is rounded to the input dtype after it is loaded, exactly as ``tensor.to(dtype)`` rounds, and ``up``'s tile is
scaled in fp32 first, as ``(s·v ⊙ B).to(dtype)`` would be. The decode forward passes the master weights as
they are and launches nothing to cast or scale them: there the GEMM takes microseconds and four small launches
would cost more than the rank-R path. Prefill casts on the host (amortised), into ``s·v ⊙ B`` with a
16-aligned row stride: read straight from a ``B`` whose rank is not a multiple of 16, the sm_90 prefill tiles
spill registers.

Each program owns one ``[BLOCK_M, BLOCK_N]`` tile of ``out``. Two strategies (``configs.py`` picks one):

- one-pass: the K loop loads the ``a`` tile once and feeds two dots (``acc += a·w``, ``t += a·down``); the
  epilogue scales ``t`` by ``rscale``, casts it to the input dtype and adds ``t·up`` to ``acc``. The N-tile-0
  programs also store ``t`` in fp32 for the backward.
- two-pass (``LOAD_T``): ``t`` was written by the shrink kernel (``shrink.py``); the program runs a plain GEMM
  K loop, then loads its rows of ``t`` and adds ``(t ⊙ rscale)·up``, walking the rank in chunks of ``BLOCK_R``
  (the config's ``rank_chunk``), so one two-pass config serves every rank. (Seeding ``acc`` before the loop,
  as LoRAFusion does, spilled 124-496 bytes at 128x256 on sm_90; so did 32-rank chunks.)

Split-K (``SPLIT_K``, decode): a second grid axis cuts K into slices; each program stores its fp32 partial
of ``out`` (and, one-pass, of ``t``) in a ``[SPLIT, ...]`` workspace, summed afterwards in a fixed order: by
``split_sum.sum_splits``, or (``REDUCE``, ``forcing.split_reduce``) by the last of each output tile's slices to
arrive at its count, in the same launch and the same order.
Everything is linear in the K partials (``Σ_k (t_k ⊙ rscale)·up = (t ⊙ rscale)·up``); the bias (and the
two-pass rank-R term) goes into slice 0 only. One-pass split-K passes each slice's partial ``t_k`` to the rank-R
dot as a hi + lo pair (``T_HI_LO``): rounding each ``t_k`` once before the sum would lose what cancels.

Rank apart (``RANK_APART``, one-pass split-K summed by a launch; ``forcing.split_rank``, the default): each K
slice's first ``cdiv(M, BLOCK_M)·cdiv(R, BLOCK_TR)`` programs are rank programs, which compute that slice's
``t_k = a_k·down_k`` alone and store it in fp32 (``[SPLIT, M, R]``); the others run the plain K loop and store
base partials. ``down`` is then read once per launch instead of once per column tile, and ``up`` once (by
``split_sum.sum_splits_rank``, which sums the partials and ``t``'s slices per output tile in slice order and adds
``(t ⊙ rscale)·up`` and the bias) instead of once per slice. ``t`` is complete when it is rounded, so there is
no hi + lo pair. Still two launches (the sum also writes ``T`` for the backward: no separate sum of its slices).

Adapter dropout (``DROPOUT``, two-pass only; ``dropout.py``): in ``dx`` the rank-R term is masked per output
entry, ``out = a·w + c · m ⊙ ((t ⊙ rscale)·up)``, from the keep bits the forward's shrink stored; it is summed
apart from ``acc`` and added once (so these tiles hold two accumulators: ``configs.fused_config`` gives the
dropout launch narrower tiles where the widest would spill). The forward's dropout is all in the shrink.

TMA (``TMA``, ``configs.tma_for``; 16-bit prefill only, never with split-K): ``a``, ``w`` and (one-pass) ``down``
arrive as host TensorDescriptors of the matrices as stored, so ``w`` is ``W [N, K]`` in the forward and ``W [K, N]``
in dx (``W_KN``), ``down`` is ``A [R, K]`` or ``s·v ⊙ B [K, R]`` (``DOWN_KR``); a transposed tile is a view for the
dot. The copy engine fills out-of-bounds rows and columns with zeros, so these loads need no masks. Only ``down``'s
rows can be narrower than 16 bytes (``s·v ⊙ B`` at ranks that are not multiples of 8): its padding columns hold
zeros (``prepare.py``), so a load that fetched them rather than filling would read zeros as well.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import configs, forcing, split_sum
from .common import FP_FUSION, as_operand, cdiv, dot_precision, to_operand, upcast_bf16
from .dropout import DropoutMask, load_keep
from .rank_terms import _add_rank_update
from .shrink import shrink

__all__ = ["fused_lora_mm"]


@triton.jit
def _store_slice_t(
    a_ptr,
    down_ptr,
    t_ptr,
    pid,
    M,
    K,
    R,
    K_PER_SPLIT,
    stride_am,
    stride_ak,
    stride_dk,
    stride_dr,
    stride_ts,
    stride_tm,
    stride_tr,
    DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_TR: tl.constexpr,
):
    """A rank program of ``RANK_APART``: ``t[s] = a_s·down_s`` in fp32 over K slice ``s = program_id(1)``, for
    the ``[BLOCK_M, BLOCK_TR]`` tile ``pid`` of ``t [M, R]`` (row tiles outer, rank tiles inner). ``down``'s
    tile is rounded to the input dtype after its load, as in the one-pass K loop."""
    num_pid_r = tl.cdiv(R, BLOCK_TR)
    pid_m = pid // num_pid_r
    pid_r = pid % num_pid_r
    pid_k = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = pid_r * BLOCK_TR + tl.arange(0, BLOCK_TR)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < R
    k_start = pid_k.to(tl.int64) * K_PER_SPLIT
    k_len = min(K - k_start, K_PER_SPLIT)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + (k_start + offs_k[None, :]) * stride_ak  # [BLOCK_M, BLOCK_K]
    d_ptrs = down_ptr + (k_start + offs_k[:, None]) * stride_dk + offs_r[None, :] * stride_dr  # [BLOCK_K, BLOCK_TR]
    t = tl.zeros((BLOCK_M, BLOCK_TR), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_len, BLOCK_K)):
        mask_k = offs_k < k_len - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        d = tl.load(d_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        d = to_operand(d, DTYPE, UPCAST)
        if UPCAST:
            a = a.to(tl.float32)
        t = tl.dot(a, d, t, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        d_ptrs += BLOCK_K * stride_dk
    t_ptrs = t_ptr + pid_k * stride_ts + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
    tl.store(t_ptrs, t, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _fused_lora_mm_kernel(
    # pointers
    a_ptr,
    w_ptr,
    down_ptr,
    up_ptr,
    rscale_ptr,
    cscale_ptr,
    bias_ptr,
    out_ptr,
    t_ptr,
    y_ptr,
    lock_ptr,
    bits_ptr,
    # sizes
    M,
    N,
    K,
    R,
    K_PER_SPLIT,
    # strides
    stride_am,
    stride_ak,
    stride_wk,
    stride_wn,
    stride_dk,
    stride_dr,
    stride_ur,
    stride_un,
    stride_os,
    stride_om,
    stride_on,
    stride_ts,
    stride_tm,
    stride_tr,
    stride_bm,
    # scalars
    scale,
    drop_scale,
    # compile-time switches and tiles
    HAS_RSCALE: tl.constexpr,
    FOLD_UP: tl.constexpr,
    HAS_CSCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_T: tl.constexpr,
    LOAD_T: tl.constexpr,
    SPLIT_K: tl.constexpr,
    REDUCE: tl.constexpr,
    RANK_APART: tl.constexpr,
    DROPOUT: tl.constexpr,
    TMA: tl.constexpr,
    W_KN: tl.constexpr,
    DOWN_KR: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_TR: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    tl.static_assert(not (TMA and SPLIT_K), "split-K runs with pointer loads only")
    tl.static_assert(SPLIT_K or not REDUCE, "the in-kernel sum is of split-K partials")
    tl.static_assert(LOAD_T or not DROPOUT, "the dropout of dx's rank-R term is two-pass")
    tl.static_assert(
        not RANK_APART or (SPLIT_K and not (LOAD_T or WRITE_T or REDUCE or HAS_BIAS)),
        "rank apart: split-K one-pass partials, t, the rank-R term and the bias left to the sum launch",
    )
    if TMA:  # a, w and (one-pass) down are descriptors; without split-K, out has the input dtype
        DTYPE = out_ptr.dtype.element_ty
    else:
        DTYPE = a_ptr.dtype.element_ty

    pid = tl.program_id(0)
    if RANK_APART:  # the first programs of each K slice compute its t, the others its base partial
        rank_programs = tl.cdiv(M, BLOCK_M) * tl.cdiv(R, BLOCK_TR)
        if pid < rank_programs:
            _store_slice_t(
                a_ptr, down_ptr, t_ptr, pid, M, K, R, K_PER_SPLIT, stride_am, stride_ak, stride_dk, stride_dr,
                stride_ts, stride_tm, stride_tr, DTYPE, UPCAST, PRECISION, BLOCK_M, BLOCK_K, BLOCK_TR,
            )  # fmt: skip
            return
        pid -= rank_programs
    # grouped ordering: GROUP_M row tiles share the W column tiles they read while those are in L2
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

    if not TMA:
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # [BLOCK_K, BLOCK_N]
        d_ptrs = down_ptr + offs_k[:, None] * stride_dk + offs_r[None, :] * stride_dr  # [BLOCK_K, BLOCK_R]
    t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr  # [BLOCK_M, BLOCK_R]
    mask_t = mask_m[:, None] & mask_r[None, :]
    k_len = K
    if SPLIT_K:  # this program reduces K slice pid_k: [pid_k·K_PER_SPLIT, +K_PER_SPLIT)
        pid_k = tl.program_id(1)
        k_start = pid_k.to(tl.int64) * K_PER_SPLIT
        a_ptrs += k_start * stride_ak
        w_ptrs += k_start * stride_wk
        d_ptrs += k_start * stride_dk
        k_len = min(K - k_start, K_PER_SPLIT)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not (LOAD_T or RANK_APART):
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_len, BLOCK_K)):
        if TMA:  # descriptors (never with split-K): out-of-bounds rows and columns arrive as zeros
            off_k = k * BLOCK_K
            a = a_ptr.load([pid_m * BLOCK_M, off_k])
            if W_KN:  # w stored [K, N] (backward: W)
                w = w_ptr.load([off_k, pid_n * BLOCK_N])
            else:  # w stored [N, K] (forward: W, read transposed)
                w = w_ptr.load([pid_n * BLOCK_N, off_k]).T
            if not (LOAD_T or RANK_APART):
                if DOWN_KR:  # down stored [K, R] (backward: v ⊙ B)
                    d = down_ptr.load([off_k, 0])
                else:  # down stored [R, K] (forward: A, read transposed)
                    d = down_ptr.load([0, off_k]).T
        else:
            mask_k = offs_k < k_len - k * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if not (LOAD_T or RANK_APART):
                d = tl.load(d_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
                d_ptrs += BLOCK_K * stride_dk
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
        if not (LOAD_T or RANK_APART):  # (an fp32 master weight is rounded to the input dtype right after the load)
            d = to_operand(d, DTYPE, UPCAST)
        if UPCAST:  # interpreter only: its bf16 arithmetic is wrong, bf16 products are exact in fp32
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)  # acc += a·w (the base GEMM)
        if not (LOAD_T or RANK_APART):  # one-pass: t += a·down (the shrink), from the same a tile
            t = tl.dot(a, d, t, input_precision=PRECISION)

    if LOAD_T:
        # two-pass: t = a·down came from the shrink kernel. acc += (t ⊙ rscale)·up, BLOCK_R ranks at a time
        # (so the tiles do not depend on the rank), in K slice 0 only
        if DROPOUT:  # dx: the rank-R term apart, masked and scaled before it joins acc
            update = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            update = acc
        for r0 in range(0, R, BLOCK_R):
            offs_rc = r0 + offs_r
            mask_rc = offs_rc < R
            mask_tc = mask_m[:, None] & mask_rc[None, :]
            if SPLIT_K:  # (a vector compare: the interpreter rejects a scalar bool in a mask)
                mask_tc = mask_tc & (tl.zeros_like(offs_r) == pid_k)[None, :]
            t = tl.load(t_ptrs + r0 * stride_tr, mask=mask_tc, other=0.0)
            update = _add_rank_update(
                update, t, rscale_ptr, up_ptr, cscale_ptr, scale, offs_rc, offs_n, mask_rc, mask_n, stride_ur,
                stride_un, DTYPE, HAS_RSCALE, FOLD_UP, HAS_CSCALE, UPCAST, PRECISION, False,
            )  # fmt: skip
        if DROPOUT:  # out's columns are x's: its entry (m, n) was dropped or kept as x[m, n]
            keep = load_keep(bits_ptr, stride_bm, offs_m, mask_m, pid_n * BLOCK_N, N, BLOCK_N, False)
            acc += tl.where(keep, update * drop_scale, 0.0)
        else:
            acc = update
    elif not (LOAD_T or RANK_APART):
        if WRITE_T:  # t (this slice's partial under SPLIT_K) in fp32 for the backward, once per row tile
            if pid_n == 0:
                if SPLIT_K:
                    t_ptrs += pid_k * stride_ts
                tl.store(t_ptrs, t, mask=mask_t)
        acc = _add_rank_update(
            acc, t, rscale_ptr, up_ptr, cscale_ptr, scale, offs_r, offs_n, mask_r, mask_n, stride_ur, stride_un,
            DTYPE, HAS_RSCALE, FOLD_UP, HAS_CSCALE, UPCAST, PRECISION, SPLIT_K,
        )  # fmt: skip
    if HAS_BIAS:
        mask_b = mask_n
        if SPLIT_K:
            mask_b = mask_b & (tl.zeros_like(offs_n) == pid_k)
        bias = tl.load(bias_ptr + offs_n, mask=mask_b, other=0.0).to(tl.float32)
        acc += bias[None, :]

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask_out = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K:  # an fp32 partial, summed by the launcher's second kernel or (REDUCE) by this tile's last slice
        tl.store(out_ptrs + pid_k * stride_os, acc, mask=mask_out)
        if REDUCE:
            # every thread's partial is stored before this program's count is released (acq_rel: the last
            # program then sees all partials); the last of the tile's slices to arrive sums them in slice order,
            # as split_sum.sum_splits does (the same result, bit for bit), and resets the count for the next launch.
            # The barrier is needed: triton 3.6 emits none before the atomic (3.9 adds its own), and one thread
            # performs it. (CUTLASS's split-K semaphore: __syncthreads, then one thread's gpu-scope release.)
            tl.debug_barrier()
            arrived = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if arrived == tl.num_programs(1) - 1:
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in range(0, tl.num_programs(1)):
                    total += tl.load(out_ptrs + s * stride_os, mask=mask_out, other=0.0, cache_modifier=".cg")
                y_ptrs = y_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on  # y: a slice's layout
                tl.store(y_ptrs, as_operand(total, y_ptr.dtype.element_ty, UPCAST), mask=mask_out)
                tl.atomic_xchg(lock_ptr + pid, 0, sem="relaxed", scope="gpu")
    else:
        out = as_operand(acc, out_ptr.dtype.element_ty, UPCAST)
        tl.store(out_ptrs, out, mask=mask_out)


SPLIT_ELEMENTS_MAX = configs.INT32_MAX
"""The GEMM offsets a split-K slice's partials by ``slice · M · N`` in int32: the launcher caps the split below
that (only a split forced on a huge layer reaches it: M ≤ 16 at decode)."""

RANK_APART_BLOCK_R = 32
"""Ranks per rank program of ``RANK_APART`` (fewer when the rank tile is narrower): 32 fp32 columns of ``down``
are 128 bytes per K row, as many as a 64-wide tile of a 16-bit ``w``, so a rank program streams as much as a
base program of the same K slice (the decode tiles are 64 wide) and does not outlast them at large ranks."""


def fused_lora_mm(
    a: Tensor,
    w: Tensor,
    down: Tensor,
    up: Tensor,
    rscale: Tensor | None,
    bias: Tensor | None,
    *,
    scale: float = 1.0,
    cscale: Tensor | None = None,
    write_t: bool,
    strategy: str | None = None,
    split_k: int | None = None,
    tma: bool | None = None,
    config: configs.FusedConfig | None = None,
    drop_a: DropoutMask | None = None,
    drop_update: DropoutMask | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``out [M, N] = a·w + ((a·down) ⊙ rscale)·(up ⊙ scale·cscale) (+ bias)``; returns ``(out, t)``.

    ``a [M, K], w [K, N], bias [N]`` share one dtype; ``down [K, R]`` and ``up [R, N]`` are in that dtype or
    float32 (rounded in the kernel); any strides. ``rscale [R]`` and ``cscale [N]`` are float32 and
    contiguous. ``t = a·down`` in float32 is returned when ``write_t``. ``strategy`` ("one_pass" /
    "two_pass"), ``split_k`` (decode only) and ``tma`` (True: TMA loads where the operands allow them; False:
    pointer loads) override the tables' choice when given; ``config`` forces the tiles (and its own strategy).
    Adapter dropout (``dropout.py``; either makes the launch two-pass, whatever is forced): ``drop_a``, the
    forward's, has the shrink draw its mask over ``a`` and compute ``t = c · (m ⊙ a)·down``; ``drop_update``,
    dx's, masks the rank-R term per output entry with a mask drawn before.
    Launches one kernel (two-pass: two; split-K: plus the sum of the slices, unless ``forcing.split_reduce``
    has the kernel sum them; one-pass split-K with ``forcing.split_rank`` "apart", the default, computes ``t``
    apart and has the sum add the rank-R term, where that sum's int32 offsets fit: ``split_sum.rank_sum_fits_int32``).
    """
    a, w = configs.narrow_k_steps(a), configs.narrow_k_steps(w, k_dim=0)
    M, K = a.shape
    N, R = w.shape[1], down.shape[1]
    block_r = configs.block_r_for(R)
    dropout = drop_a is not None or drop_update is not None
    if config is None:  # widths that are not multiples of 16 get tiles that do not spill without the JIT's hints
        strategy = "two_pass" if dropout else configs.strategy_for(M, block_r, a.dtype, a.device, strategy)
        aligned = configs.is_aligned(a, N)
        config = configs.fused_config(M, block_r, a.dtype, a.device, strategy, aligned, dropout=drop_update is not None)
    cfg = config
    if dropout and cfg.strategy != "two_pass":
        raise ValueError(f"adapter dropout runs the two-pass strategy, got config {cfg.name}")
    two_pass = cfg.strategy == "two_pass"
    if two_pass:  # the rank-R term runs over the rank in chunks of a fixed size
        block_r = cfg.rank_chunk
    if M == 0 or N == 0:  # no output tile to launch for (N = 0: t alone, from the shrink)
        out = a.new_empty(M, N)
        if not write_t or M == 0:
            return out, (a.new_empty(0, R, dtype=torch.float32) if write_t else None)
        return out, shrink(a, down if down.dtype == a.dtype else down.to(a.dtype))

    # split-K partials summed by the GEMM's own programs (forcing.split_reduce: "kernel") into y, or by a second
    # launch (also when the tiles outnumber the arrival counts). Rank apart (forcing.split_rank): one-pass
    # split-K summed by a launch has t computed once per K slice by rank programs of its own, and the rank-R
    # term, with the bias, added by the sum launch (not where the in-kernel sum falls back to a launch: that one
    # gives the in-kernel sum's result)
    sums_in_kernel = apart_if_split = False  # (both settings read only by the configs that may split K)
    if cfg.split_k:
        sums_in_kernel = forcing.split_reduce() == "kernel"
        apart_if_split = not (two_pass or sums_in_kernel) and forcing.split_rank() == "apart"
        # (else in the tiles, with int64 offsets)
        apart_if_split = apart_if_split and split_sum.rank_sum_fits_int32(M, R, up)
    block_tr = min(block_r, RANK_APART_BLOCK_R)
    rank_tiles = cdiv(M, cfg.block_m) * cdiv(R, block_tr) if apart_if_split else 0

    # split-K: slices of whole BLOCK_K steps; the last may be ragged, none is empty
    split = configs.split_k_for(M, N, K, cfg, a.device, split_k, rank_programs=rank_tiles)
    split = min(split, max(1, SPLIT_ELEMENTS_MAX // (M * N)))  # (int32 slice offsets)
    k_per_split = cdiv(max(1, cdiv(K, cfg.block_k)), split) * cfg.block_k
    split = max(1, cdiv(K, k_per_split))
    # (outputs made by a.new_empty, on a's device in its dtype unless given: about 0.7 µs less per tensor than
    # torch.empty's device= and dtype= keywords, at decode a few percent of the call)
    if split > 1:
        out = a.new_empty(split, M, N, dtype=torch.float32)
    else:
        out = a.new_empty(M, N)
    tiles = cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n)
    locks = split_sum.split_locks(a.device, tiles) if split > 1 and sums_in_kernel else None
    reduce = locks is not None
    y = a.new_empty(M, N) if reduce else None
    apart = split > 1 and apart_if_split
    rank_programs = rank_tiles if apart else 0
    grid = (rank_programs + tiles, split)
    if two_pass:  # t = a·down, fp32 [M, R]; the shrink reads down in the input dtype (a forced two-pass
        # decode forward, which passes the fp32 master A, casts it here)
        t = shrink(a, down if down.dtype == a.dtype else down.to(a.dtype), dropout=drop_a)
    elif write_t or apart:  # (rank apart: the slices' t, summed by the sum launch)
        t = a.new_empty((split, M, R) if split > 1 else (M, R), dtype=torch.float32)
    else:
        t = None

    # TMA: a, w and (one-pass) down through descriptors of the stored matrices, when all of them allow it
    loads = None
    if cfg.aligned and configs.tma_for(M, a.dtype, a.device, split, tma):  # (unaligned tiles: compiled for pointers)
        loads = _descriptors(a, w, down, cfg, block_r, load_down=not two_pass)
    a_arg, w_arg, d_arg, w_kn, down_kr = loads or (a, w, down, False, False)
    # up scaled by scale·cscale in the kernel (by the GEMM, or with the rank term apart by the sum launch)
    fold_up = up.dtype != a.dtype or cscale is not None or scale != 1.0
    update_bits = drop_update.kept_bits() if drop_update is not None else None

    _fused_lora_mm_kernel[grid](
        a_arg,
        w_arg,
        d_arg,
        up,
        rscale if rscale is not None else a,  # never read when HAS_RSCALE is False
        cscale if cscale is not None else a,  # never read when HAS_CSCALE is False
        bias if bias is not None else a,  # never read when HAS_BIAS is False
        out,
        t if t is not None else out,  # never touched when neither WRITE_T nor LOAD_T
        y if reduce else out,  # these two only with REDUCE
        locks if reduce else out,
        update_bits if update_bits is not None else out,  # only with DROPOUT
        M,
        N,
        K,
        R,
        k_per_split,
        *a.stride(),
        *w.stride(),
        *down.stride(),
        *up.stride(),
        *_strides3(out),
        *(_strides3(t) if t is not None else (0, 0, 0)),
        update_bits.stride(0) if update_bits is not None else 0,
        float(scale),
        drop_update.scale if drop_update is not None else 1.0,
        HAS_RSCALE=rscale is not None,
        FOLD_UP=fold_up,
        HAS_CSCALE=cscale is not None,
        HAS_BIAS=bias is not None and not apart,
        WRITE_T=write_t and not (two_pass or apart),
        LOAD_T=two_pass,
        SPLIT_K=split > 1,
        REDUCE=reduce,
        RANK_APART=apart,
        DROPOUT=drop_update is not None,
        TMA=loads is not None,
        W_KN=w_kn,
        DOWN_KR=down_kr,
        UPCAST=upcast_bf16(a.dtype),
        PRECISION=dot_precision(a.dtype),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        BLOCK_R=block_r,
        BLOCK_TR=block_tr,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        enable_fp_fusion=FP_FUSION,
    )
    if y is not None:  # (reduce) the kernel summed the partials into y
        out = y
    elif apart:  # the partials and t's slices, summed in a fixed order (deterministic), and the rank-R term
        part, out = out, a.new_empty(M, N)
        t_part, t = t, (a.new_empty(M, R, dtype=torch.float32) if write_t else None)
        assert t_part is not None  # (the slices' t, allocated above whenever the rank term is apart)
        split_sum.sum_splits_rank(
            part, t_part, rscale, up, cscale, bias, out, t, scale=scale, fold_up=fold_up, upcast=upcast_bf16(a.dtype),
            precision=dot_precision(a.dtype), block_m=cfg.block_m, block_n=cfg.block_n,
        )  # fmt: skip
    elif split > 1:  # the partials, summed in a fixed order (deterministic), rounded once
        part, out = out, a.new_empty(M, N)
        split_sum.sum_splits(part, out, upcast=upcast_bf16(a.dtype))
    if t is not None and t.dim() == 3:
        t = t.sum(0)
    return out, (t if write_t else None)


def _strides3(t: Tensor) -> tuple[int, ...]:
    """A 2-D or 3-D (split-K slices) tensor's strides as three, the slice stride 0 when 2-D."""
    return t.stride() if t.dim() == 3 else (0, *t.stride())


def _descriptors(a: Tensor, w: Tensor, down: Tensor, cfg: configs.FusedConfig, block_r: int, *, load_down: bool):
    """TMA descriptors ``(a, w, down, W_KN, DOWN_KR)`` of the stored matrices behind ``a [M, K]``, ``w [K, N]``
    and ``down [K, R]`` (passed on as it is unless ``load_down``), or None when one of them cannot be described
    (TMA needs a unit-stride dim, distinct rows, the other stride and the base 16-byte aligned). ``W_KN`` /
    ``DOWN_KR``: stored as ``[K, N]`` / ``[K, R]``, else transposed (``[N, K]``: the forward's ``W``;
    ``[R, K]``: its ``A``)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    def describe(t: Tensor, rows: int, cols: int, transposed: bool = True):
        # t [rows-dim, cols-dim] -> (descriptor, stored as is), from t or (when allowed) from tᵀ
        candidates = [(t, [rows, cols], True)]
        if transposed:
            candidates.append((t.t(), [cols, rows], False))
        for stored, block, as_is in candidates:
            # rows that neither overlap nor repeat (a broadcast dy has row stride 0), 16-byte aligned
            rows_apart = stored.stride(0) >= stored.shape[1] and stored.stride(0) * stored.element_size() % 16 == 0
            if stored.stride(1) == 1 and rows_apart and stored.data_ptr() % 16 == 0:
                return TensorDescriptor.from_tensor(stored, block), as_is
        return None

    a_desc = describe(a, cfg.block_m, cfg.block_k, transposed=False)
    w_desc = describe(w, cfg.block_k, cfg.block_n)
    d_desc = describe(down, cfg.block_k, block_r) if load_down else (down, False)  # unloaded: no flag
    if a_desc is None or w_desc is None or d_desc is None:
        return None
    return a_desc[0], w_desc[0], d_desc[0], w_desc[1], d_desc[1]
