"""Named layer shapes from real models, token counts, ranks and dtypes: the grid the benchmarks sweep.

A shape is one adapted projection ``x [M, K] -> y [M, N]`` (nn.Linear layout ``W [N, K]``). The GPU grid
uses the models' real sizes; the CPU grid uses the same projections scaled down (``/8``) so a CPU run of
the whole suite takes a few minutes. Each grid has a default tier and a ``slow`` tier (heavier shapes,
more token counts and ranks) selected with ``-m slow``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from tied_lora_kernels.kernels.configs import DECODE_MAX_M

__all__ = ["Shape", "SHAPES", "Case", "linear_cases", "flops", "min_bytes", "DECODE_MAX_M"]


@dataclass(frozen=True)
class Shape:
    """One projection of one model: ``in_features = K``, ``out_features = N``."""

    name: str
    K: int
    N: int

    def scaled(self, divisor: int) -> Shape:
        return Shape(f"{self.name}/{divisor}", self.K // divisor, self.N // divisor)


# LLaMA-2-7B: d = 4096, 32 heads (no GQA), SwiGLU FFN 11008. q/k/v/o share one shape, gate/up another.
# LLaMA-3-8B: d = 4096, 8 KV heads of 128 (GQA: k/v are 4096 -> 1024), FFN 14336.
# GPT-2B (NeMo, the paper's second model): d = 2048, 24 layers, fused QKV 2048 -> 6144 (docs/design.md §1).
SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("llama2-7b.qkvo", 4096, 4096),
        Shape("llama2-7b.gate_up", 4096, 11008),
        Shape("llama2-7b.down", 11008, 4096),
        Shape("llama2-7b.qkv_fused", 4096, 12288),
        Shape("llama3-8b.q_o", 4096, 4096),
        Shape("llama3-8b.kv", 4096, 1024),
        Shape("llama3-8b.gate_up", 4096, 14336),
        Shape("gpt-2b.qkv_fused", 2048, 6144),
        Shape("gpt-2b.o", 2048, 2048),
    )
}

# M <= DECODE_MAX_M (16): decode, the kernels' decode regime; forward (inference) only, timed with CUDA graphs


@dataclass(frozen=True)
class Case:
    """One benchmark point: a shape, M tokens, a rank, a dtype, a mode and whether it is slow-tier."""

    shape: Shape
    M: int
    rank: int
    dtype: torch.dtype
    mode: str  # "forward" | "backward" | "fwd+bwd"
    slow: bool

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.shape.name}-M{self.M}-r{self.rank}-{dt}-{self.mode}"


MODES = ("forward", "backward", "fwd+bwd")

# Per device and tier, one or more grids of (shape names, prefill Ms, decode Ms, ranks, dtypes). The default
# GPU tier is sized for gpu_check.sh's bench-linear phase (a time budget; providers.schedule runs first what
# issue 3's targets read): the headline layer (LLaMA-2-7B q/k/v/o, K = N = 4096) at M = 8192 and decode
# M = 1, 16, at the r = 8, 16 and 64 (16 and 64 on either side of the one-pass / two-pass crossover that
# kernels/configs.py estimates), then the other shapes at r = 16; M = 2048 and the rest live in the slow tier,
# the full grid of the issue.
_BF16 = (torch.bfloat16,)
_GRID = {
    ("cuda", "default"): (
        (("llama2-7b.qkvo",), (8192,), (1, 16), (8, 16, 64), _BF16),
        (("llama2-7b.gate_up", "llama3-8b.kv", "gpt-2b.qkv_fused"), (8192,), (1,), (16,), _BF16),
    ),
    ("cuda", "slow"): (
        (
            tuple(SHAPES),
            (512, 1024, 2048, 4096, 8192, 16384),
            (1, 2, 4, 8, 16),
            (8, 16, 64),
            (torch.float16, torch.bfloat16),
        ),
    ),
    ("cpu", "default"): (
        (
            ("llama2-7b.qkvo/8", "llama3-8b.kv/8", "gpt-2b.qkv_fused/8"),
            (128, 512),
            (1, 16),
            (8, 16),
            (torch.float32,),
        ),
    ),
    ("cpu", "slow"): (
        (
            ("llama2-7b.qkvo/8", "llama2-7b.gate_up/8", "llama2-7b.down/8", "llama3-8b.kv/8", "gpt-2b.qkv_fused/8"),
            (128, 256, 512, 1024),
            (1, 4, 16),
            (8, 16, 64),
            (torch.float32,),
        ),
    ),
}


def _shape(name: str) -> Shape:
    base, _, div = name.partition("/")
    return SHAPES[base].scaled(int(div)) if div else SHAPES[base]


def linear_cases(device_type: str) -> list[Case]:
    """Every case of the device's grid: the default tier, then what only the slow tier adds."""
    seen: set[str] = set()
    cases: list[Case] = []
    grids = [(tier, grid) for tier in ("default", "slow") for grid in _GRID[(device_type, tier)]]
    for tier, (names, prefill, decode, ranks, dtypes) in grids:
        for name, dtype, rank in itertools.product(names, dtypes, ranks):
            shape = _shape(name)
            points = [(m, mode) for m in prefill for mode in MODES] + [(m, "forward") for m in decode]
            for M, mode in points:
                case = Case(shape, M, rank, dtype, mode, slow=tier == "slow")
                if case.id not in seen:
                    seen.add(case.id)
                    cases.append(case)
    return cases


def flops(M: int, K: int, N: int, R: int, mode: str, adapter: bool = True) -> int:
    """Useful FLOPs of one call: base GEMM plus the rank-R path (frozen base: no dW in backward).

    forward: ``2MNK + 2MR(K+N)``; backward: ``dx = dy W`` (2MNK) plus ``G, dS, dA, dT A`` (``4MR(K+N)``).
    """
    base = 2 * M * N * K
    lora = 2 * M * R * (K + N) if adapter else 0
    fwd, bwd = base + lora, base + 2 * lora
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}[mode]


def min_bytes(M: int, K: int, N: int, R: int, mode: str, elem: int, adapter: bool = True) -> int:
    """Compulsory DRAM traffic of one call: each operand read once, each result written once."""
    ad = R * (K + N) * 4 if adapter else 0  # fp32 master A, B (u, v negligible)
    fwd = (M * K + N * K + M * N) * elem + ad  # read x, W; write y
    bwd = (M * N + N * K + M * K) * elem + (M * K * elem if adapter else 0) + ad  # dy, W, dx (+ x for dA)
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}[mode]
