"""Fused Triton kernels for Tied-LoRA (docs/design.md §3-§7).

``unavailable_reason(device)`` says why the kernels cannot run on a device (None when they can; on Hopper it
first makes triton assemble them with a ptxas that does not corrupt them: ``hopper_ptxas``);
``tied_lora_linear_triton`` is what ``tied_lora_linear(..., backend="triton")`` calls.

- ``forward.py``: the fused GEMM (forward ``y`` and backward ``dx``; one-pass or two-pass, split-K at
  decode) and its launcher;
- ``rank_terms.py``: the rank-R term an output tile adds (the fused GEMM's epilogue, and the split-K sum's);
- ``split_sum.py``: the sums of the split-K partials (with the rank-R term apart or not) and their launchers,
  and the arrival counts with which the GEMM sums them itself;
- ``prepare.py``: the adapters as a prefill GEMM reads them (``A`` cast, ``s·v ⊙ B`` folded), one launch;
- ``shrink.py``: the two-pass strategy's first kernel (``T = x Aᵀ``, ``dS / s = dy (v ⊙ B)`` in fp32);
- ``dropout.py``: adapter dropout's mask (drawn by the shrink, stored as bits, read by dx and ``dA``);
- ``backward.py``: the rank-gradient reduction over tokens (``dA = dTᵀx``; ``G = dyᵀS``, finished in its
  epilogue into ``dB``, ``dv``, ``du``);
- ``function.py``: the ``autograd.Function`` joining them (all the math in its docstring), and the custom ops
  ``torch.compile`` and ``torch.export`` see in its place;
- ``configs.py``: every block config and strategy a launch can pick;
- ``forcing.py``: how benchmarks, tests and the environment force a choice (``TIED_LORA_STRATEGY``,
  ``TIED_LORA_TMA``, ``TIED_LORA_SPLIT_REDUCE``, ``TIED_LORA_SPLIT_RANK``, ``forcing.forced``);
- ``compile_check.py``: compiles each ahead of time for the GPUs its table serves (sm_90 and sm_100; sm_80
  and sm_120) and reports registers, spills, shared memory and wgmma;
- ``common.py``: dot precision, the interpreter's bf16 workaround, the host ``cdiv``;
- ``ptxas.py``: which ptxas assembles the kernels for Hopper (``hopper_ptxas``: not one that corrupts them).
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "unavailable_reason",
    "interpreting",
    "tied_lora_linear_triton",
    "MIN_TRITON",
    "release",
    "hopper_ptxas",
    "FIXED_HOPPER_PTXAS",
]

MIN_TRITON = (3, 4)
"""The oldest triton the kernels run on: triton 3.3 cannot compile them (it rejects their language constructs and
has no tensor descriptors); 3.4 and 3.5 compile every config (a few spill registers) and pass the kernel tests
under the interpreter (checked once, 2026-12-05); 3.6 (the GPU image's) and 3.9 (CI's) are checked on every change,
zero spills included (docs/testing.md, Versions tested)."""


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, set before import): the
    values triton itself reads as on (``1``, ``true``, ``on``, ``yes``, ``y``, any case; ``false`` or ``2`` are off)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE


_TRUE = ("1", "true", "on", "yes", "y")


def release(version: str) -> tuple[int, ...]:
    """``"3.6.0"``, ``"3.4.0+git1a2b"`` or ``"3.5.0.post21"`` as ``(3, 6)``, ``(3, 4)``, ``(3, 5)``: major and minor."""
    parts = []
    for part in version.split("+")[0].split(".")[:2]:
        digits = part[: len(part) - len(part.lstrip("0123456789"))]
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


from .ptxas import FIXED_HOPPER_PTXAS, hopper_ptxas  # noqa: E402 (ptxas.py uses release)


def unavailable_reason(device: torch.device) -> str | None:
    """Why the fused kernels cannot run on ``device``, or None when they can."""
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    if release(triton.__version__) < MIN_TRITON:
        return (
            f"triton {triton.__version__} is installed and the kernels need triton >= {'.'.join(map(str, MIN_TRITON))} "
            "(older versions cannot compile them): upgrade triton"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if torch.version.hip is not None:  # ROCm reports its gfx version as a "capability" (9.4 on MI300)
            return "the kernels and their configs are written for NVIDIA GPUs; ROCm is not supported"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"the kernels need compute capability 8.0 or newer, {device} has {major}.{minor}"
        return hopper_ptxas() if major == 9 else None  # (ptxas.py)
    if device.type == "cpu" and interpreting():
        return None
    return f"the kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got a {device.type} tensor"


def tied_lora_linear_triton(x2d, weight, bias, A, B, u, v, scale: float, *, deterministic: bool, dropout: float = 0.0):
    """The triton backend of ``tied_lora_linear`` on 2-D ``x`` (see ``function.py``; imports triton lazily). It
    checks the dtype and the rank only: call ``tied_lora_linear``, which checks the shapes, dtypes and devices
    first (a mismatched shape here reads outside a tensor)."""
    impl = _triton_impl if _triton_impl is not None else _import_triton_impl()
    return impl(x2d, weight, bias, A, B, u, v, scale, deterministic=deterministic, dropout=dropout)


_triton_impl = None
"""``function.tied_lora_linear_triton`` once imported: an import statement per call costs a microsecond, and
a ``functools.cache`` around the import made torch.compile warn at every compile that it traces through it."""


def _import_triton_impl():
    global _triton_impl
    from .function import tied_lora_linear_triton

    _triton_impl = tied_lora_linear_triton
    return tied_lora_linear_triton
