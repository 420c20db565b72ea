"""The sums of split-K partials (docs/design.md §7): at decode the fused GEMM (``forward.py``) may cut K into slices,
each storing its fp32 partial of ``out`` (and, one-pass, of ``t``) in a ``[SPLIT, ...]`` workspace; they are summed in
a fixed order, slice 0 first, so the result does not depend on which slice finished first (deterministic).

- ``sum_splits``: ``out = Σ_s part[s]``, rounded once (``_sum_splits_kernel``).
- ``sum_splits_rank`` (``RANK_APART``, ``forcing.split_rank`` "apart"): per output tile, the base partials and
  ``t``'s slices summed, then ``(t ⊙ rscale)·(up ⊙ scale·cscale)`` and the bias added (``_sum_splits_rank_kernel``),
  so that ``up`` is read once per launch, not once per slice; it also writes ``T`` for the backward.
- ``split_locks``: the arrival counts with which the GEMM's own programs sum the slices instead (``REDUCE``,
  ``forcing.split_reduce`` "kernel"; the last slice of each output tile to arrive sums them in the same order).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import configs
from .common import FP_FUSION, as_operand, cdiv
from .rank_terms import _add_rank_update

__all__ = ["sum_splits", "sum_splits_rank", "split_locks", "rank_sum_fits_int32"]


@triton.jit
def _sum_splits_kernel(
    # pointers
    part_ptr,
    out_ptr,
    # sizes
    SPLIT,
    NUMEL,
    # strides
    stride_ps,
    # compile-time switches and tiles
    UPCAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out = Σ_s part[s]`` over the split-K partials, in slice order (deterministic), rounded once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    part_ptrs = part_ptr + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, SPLIT):
        acc += tl.load(part_ptrs, mask=mask, other=0.0)
        part_ptrs += stride_ps
    tl.store(out_ptr + offs, as_operand(acc, out_ptr.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def _sum_splits_rank_kernel(
    # pointers
    part_ptr,
    t_ptr,
    rscale_ptr,
    up_ptr,
    cscale_ptr,
    bias_ptr,
    out_ptr,
    tsum_ptr,
    # sizes
    M,
    N,
    R,
    SPLIT,
    # strides (the launcher's workspaces and outputs are contiguous: unit strides along N and R)
    stride_ps,
    stride_pm,
    stride_ts,
    stride_tm,
    stride_ur,
    stride_un,
    stride_om,
    stride_sm,
    # scalars
    scale,
    # compile-time switches and tiles
    HAS_RSCALE: tl.constexpr,
    FOLD_UP: tl.constexpr,
    HAS_CSCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_T: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """The split-K sum of ``RANK_APART``, per ``[BLOCK_M, BLOCK_N]`` tile of ``out``: the base partials and
    ``t``'s slices each summed in slice order (fp32, deterministic), then ``out = Σ part + (t ⊙ rscale)·(up ⊙
    scale·cscale) + bias`` rounded once. ``t`` is complete here, so it is rounded once as the dot operand, as in
    an unsplit launch. The rank is walked ``BLOCK_R`` at a time (``RANK_SUM_CHUNK``). ``WRITE_T``: the
    column-tile-0 programs also store ``t``'s sum (fp32) in ``tsum``. Offsets are int32 (``rank_sum_fits_int32``):
    64-bit ones, a register pair per element of each pointer tile, made ptxas spill 8-12 bytes in some rows."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (int32 offsets: the launcher checks they fit)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_out = mask_m[:, None] & mask_n[None, :]
    part_ptrs = part_ptr + offs_m[:, None] * stride_pm + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, SPLIT):
        acc += tl.load(part_ptrs, mask=mask_out, other=0.0)
        part_ptrs += stride_ps
    DTYPE = out_ptr.dtype.element_ty
    for r0 in range(0, R, BLOCK_R):  # ranks r0 .. r0 + BLOCK_R: t's slices summed, then expanded
        offs_rc = r0 + offs_r
        mask_rc = offs_rc < R
        mask_t = mask_m[:, None] & mask_rc[None, :]
        t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_rc[None, :]
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for _ in range(0, SPLIT):
            t += tl.load(t_ptrs, mask=mask_t, other=0.0)
            t_ptrs += stride_ts
        if WRITE_T:
            if pid_n == 0:
                tl.store(tsum_ptr + offs_m[:, None] * stride_sm + offs_rc[None, :], t, mask=mask_t)
        acc = _add_rank_update(
            acc, t, rscale_ptr, up_ptr, cscale_ptr, scale, offs_rc, offs_n, mask_rc, mask_n, stride_ur, stride_un,
            DTYPE, HAS_RSCALE, FOLD_UP, HAS_CSCALE, UPCAST, PRECISION, False,
        )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = as_operand(acc, DTYPE, UPCAST)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out, mask=mask_out)


SUM_BLOCK, SUM_WARPS = 1024, 4
"""The split-K sum's tile (elements per program) and warps: a memory-bound copy-like kernel."""

RANK_SUM_CHUNK = 16
"""Ranks per step of the rank-apart sum's rank-R term: a whole-rank ``up`` tile held up to 242 registers at R = 128
with unaligned widths, and 32-rank steps spilled 8 bytes (at 96 registers) in dx's unaligned sum on sm_80
(triton 3.9)."""

RANK_SUM_WARPS = 8
"""Warps of the rank-apart sum (of the GEMM's output tile, 16x64 at decode). With its int32 offsets, 8 warps
compile with no spill on triton 3.6 and 3.9 for every set of the bias, ``u`` and ``v`` switches (80 rows each, at
most 60 registers); 4 warps spilled 8 bytes on triton 3.9 (its ptxas options) in 4 of 80 rows with every switch
on. With int64 offsets no count had been clean on both versions."""


def sum_splits(part: Tensor, out: Tensor, *, upcast: bool) -> None:
    """``out [M, N] = Σ_s part[s]`` over ``part [SPLIT, M, N]`` (fp32, its slices contiguous), in slice order,
    rounded once into ``out``'s dtype. One launch."""
    split, M, N = part.shape
    _sum_splits_kernel[(cdiv(M * N, SUM_BLOCK),)](
        part, out, split, M * N, part.stride(0), UPCAST=upcast, BLOCK=SUM_BLOCK, num_warps=SUM_WARPS,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


def sum_splits_rank(
    part: Tensor,
    t_part: Tensor,
    rscale: Tensor | None,
    up: Tensor,
    cscale: Tensor | None,
    bias: Tensor | None,
    out: Tensor,
    t: Tensor | None,
    *,
    scale: float,
    fold_up: bool,
    upcast: bool,
    precision: str,
    block_m: int,
    block_n: int,
) -> None:
    """``out [M, N] = Σ_s part[s] + ((Σ_s t_part[s]) ⊙ rscale)·(up ⊙ scale·cscale) + bias``, and ``t [M, R] =
    Σ_s t_part[s]`` (fp32) when given, from ``part [SPLIT, M, N]`` and ``t_part [SPLIT, M, R]`` (fp32, contiguous);
    ``up [R, N]`` as the GEMM read it (``fold_up``: scaled by ``scale·cscale`` here). Tiles of the GEMM's output
    tile; int32 offsets (``rank_sum_fits_int32``). One launch."""
    split, M, N = part.shape
    R = t_part.shape[2]
    write_t = t is not None
    _sum_splits_rank_kernel[(cdiv(M, block_m) * cdiv(N, block_n),)](
        part,
        t_part,
        rscale if rscale is not None else part,  # never read when HAS_RSCALE is False
        up,
        cscale if cscale is not None else part,  # never read when HAS_CSCALE is False
        bias if bias is not None else out,  # never read when HAS_BIAS is False
        out,
        t if t is not None else part,  # never written when WRITE_T is False
        M,
        N,
        R,
        split,
        *part.stride()[:2],
        *t_part.stride()[:2],
        *up.stride(),
        out.stride(0),
        R,
        float(scale),
        HAS_RSCALE=rscale is not None,
        FOLD_UP=fold_up,
        HAS_CSCALE=cscale is not None,
        HAS_BIAS=bias is not None,
        WRITE_T=write_t,
        UPCAST=upcast,
        PRECISION=precision,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=RANK_SUM_CHUNK,
        num_warps=RANK_SUM_WARPS,
        num_stages=1,  # (no dot in its loops: nothing to pipeline)
        enable_fp_fusion=FP_FUSION,
    )


def rank_sum_fits_int32(M: int, R: int, up: Tensor) -> bool:
    """Whether the rank-apart sum's int32 offsets reach every element it reads or writes: ``t``'s slices and sum
    (``[M, R]`` each, contiguous) and ``up`` (``[R, N]``, as strided); those of the partials and the output stay
    under ``M·N``, which the split-K cap (``SPLIT_ELEMENTS_MAX``) keeps in int32 when K is split."""
    last_up = sum((size - 1) * abs(stride) for size, stride in zip(up.shape, up.stride(), strict=True))
    return M * R <= configs.INT32_MAX and last_up <= configs.INT32_MAX


_SPLIT_LOCKS: dict[tuple[torch.device, int], Tensor] = {}
_SPLIT_LOCKS_MADE = threading.Lock()
"""Held while a shared buffer is made: two threads' first launches on one stream must not make one each (the
dropped one, freed while its kernel may still run, goes back to the allocator for other work on another stream)."""
_SPLIT_LOCK_COUNT = 4096
"""Arrival counts per device and stream: output tiles of one split-K launch (``cdiv(M, 16) · cdiv(N, BLOCK_N)``;
the default split reaches ~260 tiles, a forced one on a layer wider than 262,144 falls back to the sum launch)."""


def split_locks(device: torch.device, tiles: int) -> Tensor | None:
    """Zeroed int32 arrival counts, one per output tile, for split-K partials summed in the kernel (``REDUCE``),
    or None when there are more tiles than counts. Eager launches share one buffer per device and stream (launches
    on a stream run in order, and each leaves its counts at zero); it is created once and never replaced, so no
    launch still in flight loses it. A launch being captured into a CUDA graph gets a buffer of its own, zeroed
    inside the graph at each replay: a graph replays on whatever stream is current, beside other graphs and eager
    launches, so it shares counts with none of them. The shared buffer is allocated by a thread of its own, on the
    device's default stream, which the current one then waits for: ``torch.compile(mode="reduce-overhead")`` warms
    a graph up eagerly with every allocation of the warming thread routed to the graph's memory pool (torch ≥ 2.8
    routes by thread; earlier versions by stream), which must not hold a buffer that outlives the graph (its checks
    refuse one; unchecked, the pool could hand the memory out again)."""
    if tiles > _SPLIT_LOCK_COUNT:
        return None
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(tiles, device=device, dtype=torch.int32)
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    locks = _SPLIT_LOCKS.get(key)
    if locks is None:
        with _SPLIT_LOCKS_MADE:
            locks = _SPLIT_LOCKS.get(key)  # (another thread's, made while this one waited)
            if locks is None:
                locks = _in_own_thread(lambda: torch.zeros(_SPLIT_LOCK_COUNT, device=device, dtype=torch.int32))
                _SPLIT_LOCKS[key] = locks
        if device.type == "cuda":  # (a new thread's current stream is the default stream)
            torch.cuda.current_stream(device).wait_stream(torch.cuda.default_stream(device))
    return locks


def _in_own_thread(make: Callable[[], Tensor]) -> Tensor:
    """``make()`` run by a new thread, whose allocations no CUDA-graph memory pool claims; its exception is raised
    here."""
    result: list[Tensor] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(make())
        except BaseException as e:  # (raised again in the calling thread)
            error.append(e)

    worker = threading.Thread(target=run, name="tied_lora_kernels-split-locks")
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]
