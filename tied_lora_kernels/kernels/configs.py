"""Every block configuration the launchers can pick, in one place (the compile check walks the same tables).

Two kernels launch: the fused GEMM (forward ``y``, backward ``dx``; ``forward.py``) and the rank-gradient
reduction (``G = dyᵀ S`` and ``dAᵀ = xᵀ dT``; ``backward.py``). Configs are picked by shape heuristics, not
autotuned: no autotune trial can run a kernel twice into an accumulated gradient, and CPU runs (the
interpreter) see the same choice as the GPU.

Each table is keyed by architecture ("sm90" / "sm80", see ``arch_of``), token regime (decode: M ≤ 16,
prefill: larger), input width (16-bit or fp32) and the rank tile ``BLOCK_R = max(16, next_pow2(R))``, which
sets the size of the second accumulator ``t [BLOCK_M, BLOCK_R]`` and hence register pressure. Tiles shrink
as ``BLOCK_R`` grows so that every entry compiles with zero register spills for its architecture, with
triton 3.6 and 3.9 (``compile_check.py``; design.md §7). fp32 uses small tiles: exact-IEEE dots run on CUDA
cores and hold their operands in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "MAX_RANK",
    "BLOCK_RS",
    "FusedConfig",
    "RankGradConfig",
    "block_r_for",
    "fused_config",
    "rank_grad_config",
    "all_fused_configs",
    "all_rank_grad_configs",
    "arch_of",
    "ARCHS",
    "SHARED_MEMORY_LIMIT",
]

MAX_RANK = 128
"""Largest rank the triton kernels support (the torch backend has no limit)."""

BLOCK_RS = (16, 32, 64, 128)
"""Every rank tile a launch can use: ranks are padded up to the next of these."""

DECODE_MAX_M = 16
"""Up to this many tokens a launch uses the decode tiles (a read of W, M padded to 16)."""


@dataclass(frozen=True)
class FusedConfig:
    """Tiles of the fused GEMM ``out = a·w + ((a·down) ⊙ rscale)·up (+ bias)``: out tile ``BLOCK_M × BLOCK_N``."""

    name: str
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class RankGradConfig:
    """Tiles of ``out [C, R] = Σ_m a[m, c] · p[m, r]``: ``BLOCK_C`` rows per program, ``BLOCK_M`` tokens per step."""

    name: str
    block_c: int
    block_m: int
    num_warps: int
    num_stages: int


# (arch, regime, is 32-bit, BLOCK_R) -> config. arch "sm90": Hopper and newer; "sm80": Ampere/Ada, whose
# mma.sync accumulators need more registers and whose shared memory can be 99 KB (sm_86/sm_89).
_FUSED: dict[tuple[str, str, bool, int], FusedConfig] = {}
ARCHS = ("sm90", "sm80")
REGIMES = ("decode", "prefill")
SHARED_MEMORY_LIMIT = {"sm90": 232448, "sm80": 101376}
"""Bytes of shared memory one program may use: H100 (227 KB), and the smallest of sm_80/86/89 (99 KB)."""


def _add_fused(arch, regime, wide, block_rs, bm, bn, bk, warps, stages, group_m=8):
    for br in block_rs:
        name = f"{arch}-{regime}-{'fp32' if wide else '16bit'}-r{br}"
        _FUSED[(arch, regime, wide, br)] = FusedConfig(name, bm, bn, bk, group_m, warps, stages)


for _arch in ARCHS:
    # decode, M <= 16: a stream over W; 16 rows is the smallest tensor-core tile
    _add_fused(_arch, "decode", False, BLOCK_RS, 16, 64, 64, 4, 3)
    # fp32 runs exact-IEEE dots on CUDA cores unless TF32 is allowed: small tiles, 8 warps (4 spill at
    # R = 128 on sm_80), one config for every M
    for _regime in REGIMES:
        _add_fused(_arch, _regime, True, BLOCK_RS, 32, 32, 32, 8, 2)
# prefill / training, M > 16. design.md §7: 128x256x64, 8 warps at small ranks on sm_90; narrower as R grows
_add_fused("sm90", "prefill", False, (16, 32), 128, 256, 64, 8, 3)
_add_fused("sm90", "prefill", False, (64,), 128, 128, 64, 8, 3)
_add_fused("sm90", "prefill", False, (128,), 128, 128, 32, 8, 3)
_add_fused("sm80", "prefill", False, (16, 32, 64), 128, 128, 32, 8, 3)
_add_fused("sm80", "prefill", False, (128,), 128, 64, 32, 8, 3)

# (arch, is 32-bit, BLOCK_R) -> config
_RANK_GRAD: dict[tuple[str, bool, int], RankGradConfig] = {}
for _arch in ARCHS:
    for _br in BLOCK_RS:
        _RANK_GRAD[(_arch, False, _br)] = RankGradConfig(
            f"{_arch}-rankgrad-16bit-r{_br}", 128 if _br <= 32 else 64, 64, 8 if _br == 128 else 4, 3
        )
        _RANK_GRAD[(_arch, True, _br)] = RankGradConfig(
            f"{_arch}-rankgrad-fp32-r{_br}", 64 if _br <= 32 else 32, 16, 8 if _br == 128 else 4, 2
        )


def arch_of(device: torch.device) -> str:
    """The config table for ``device``: "sm90" on Hopper and datacenter Blackwell (227 KB shared memory) and
    under the interpreter, "sm80" elsewhere (Ampere, Ada and consumer Blackwell have 99-163 KB)."""
    if device.type != "cuda":
        return "sm90"
    return "sm90" if torch.cuda.get_device_capability(device)[0] in (9, 10) else "sm80"


def block_r_for(rank: int) -> int:
    """The padded rank tile ``max(16, next_pow2(rank))`` (tensor-core dots need at least 16)."""
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank must be in [1, {MAX_RANK}] for the triton kernels, got {rank}")
    return next(br for br in BLOCK_RS if br >= rank)


def _is_wide(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


def fused_config(M: int, block_r: int, dtype: torch.dtype, device: torch.device) -> FusedConfig:
    """The fused-GEMM tiles for ``M`` output rows, rank tile ``block_r``, input dtype and device."""
    regime = "decode" if M <= DECODE_MAX_M else "prefill"
    return _FUSED[(arch_of(device), regime, _is_wide(dtype), block_r)]


def rank_grad_config(block_r: int, dtype: torch.dtype, device: torch.device) -> RankGradConfig:
    """The rank-gradient reduction tiles for rank tile ``block_r``, input dtype and device."""
    return _RANK_GRAD[(arch_of(device), _is_wide(dtype), block_r)]


def all_fused_configs() -> list[tuple[str, FusedConfig, int, bool]]:
    """Every ``(arch, config, BLOCK_R, is_fp32)`` that ``fused_config`` can return."""
    return [(arch, cfg, br, wide) for (arch, _, wide, br), cfg in _FUSED.items()]


def all_rank_grad_configs() -> list[tuple[str, RankGradConfig, int, bool]]:
    """Every ``(arch, config, BLOCK_R, is_fp32)`` that ``rank_grad_config`` can return."""
    return [(arch, cfg, br, wide) for (arch, wide, br), cfg in _RANK_GRAD.items()]
