"""Helpers shared by the kernels: dot precision, and the interpreter's bf16 workaround.

bf16 under ``TRITON_INTERPRET=1`` (docs/design.md §6): the interpreter's bf16 ``tl.dot`` and bf16 elementwise
math operate on raw bit patterns, and its float32 → bf16 conversion truncates. The kernels therefore take
an ``UPCAST`` switch, set only when interpreting bf16 inputs: every loaded bf16 tile is converted to fp32
right after the load (exact), and every value that the GPU rounds to bf16 (the epilogue's dot operand, the
stored output) is rounded to nearest-even in fp32 bit arithmetic (``as_operand``). A bf16 × bf16 product is
exact in fp32 and tensor cores accumulate in fp32, so the interpreter then computes what the GPU computes,
up to summation order. On a GPU ``UPCAST`` is False and the code is the plain bf16 kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting

__all__ = ["as_operand", "to_operand", "upcast_bf16", "dot_precision", "cdiv", "FP_FUSION"]

FP_FUSION = True
"""Passed as ``enable_fp_fusion`` to every launch (and to the compile check): multiply-adds may contract to FMA,
as they always have. Triton 3.9 warns when the choice is left to its default, which 3.10 turns off; pinning it
keeps the kernels' numerics and register counts what the tests and the compile check saw, on every version."""


@triton.jit
def as_operand(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """``x`` (fp32) rounded to ``DTYPE``; with ``UPCAST`` rounded to bf16 but kept as fp32 (interpreter)."""
    if UPCAST:
        # round to nearest even at bit 16, then drop the low 16 bits: a bf16 value held in fp32. A NaN stays NaN
        # (the sum wraps for payloads with high bits: 0x7FFFFFFF became -0.0)
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    else:
        return x.to(DTYPE)


@triton.jit
def to_operand(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """A loaded tile as a dot operand in the input dtype ``DTYPE``: a tile stored in another dtype (an adapter's
    fp32 master weight) is rounded to ``DTYPE`` once, as ``tensor.to(DTYPE)`` would; with ``UPCAST`` it is
    kept in fp32 (rounded to bf16 values when it was not bf16 already)."""
    if x.dtype != DTYPE:
        return as_operand(x.to(tl.float32), DTYPE, UPCAST)
    elif UPCAST:
        return x.to(tl.float32)
    else:
        return x


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the launchers' grids and splits (``triton.cdiv`` is a constexpr function in newer
    triton: about 1.5 µs a call on the host, where this is a few tens of nanoseconds)."""
    return -(-a // b)


try:
    INTERPRETING = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton before 3.4 has no knobs
    INTERPRETING = interpreting()
"""Whether the kernels below were built for triton's interpreter: ``@triton.jit`` reads ``TRITON_INTERPRET``
(``knobs.runtime.interpret``) when it decorates them, at this module's import; read once here, not per launch."""


def upcast_bf16(dtype: torch.dtype) -> bool:
    """True when bf16 tiles must be computed in fp32 (the interpreter's bf16 gap; never on a GPU)."""
    return dtype == torch.bfloat16 and INTERPRETING


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: TF32 for fp32 only when torch allows it for matmuls, else exact IEEE."""
    if dtype != torch.float32 or INTERPRETING:
        return "ieee"
    return "tf32" if _tf32_allowed() else "ieee"


def _tf32_allowed() -> bool:
    # torch ≥ 2.9 has fp32_precision ("tf32" under the legacy and the new settings alike); reading the legacy
    # allow_tf32 after the new API was used raises, so only older torch reads it
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(matmul.allow_tf32)
