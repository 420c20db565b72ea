"""Fused Triton kernels for Tied-LoRA (docs/design.md §3-§7).

``unavailable_reason(device)`` says why the kernels cannot run on a device (None when they can; on Hopper it
first makes triton assemble them with a ptxas that does not corrupt them: ``hopper_ptxas``);
``tied_lora_linear_triton`` is what ``tied_lora_linear(..., backend="triton")`` calls.

- ``forward.py``: the fused GEMM (forward ``y`` and backward ``dx``; one-pass or two-pass, split-K at
  decode) and its launcher;
- ``prepare.py``: the adapters as a prefill GEMM reads them (``A`` cast, ``s·v ⊙ B`` folded), one launch;
- ``shrink.py``: the two-pass strategy's first kernel (``T = x Aᵀ``, ``dS / s = dy (v ⊙ B)`` in fp32);
- ``dropout.py``: adapter dropout's mask (drawn by the shrink, stored as bits, read by dx and ``dA``);
- ``backward.py``: the rank-gradient reduction over tokens (``dA = dTᵀx``; ``G = dyᵀS``, finished in its
  epilogue into ``dB``, ``dv``, ``du``);
- ``function.py``: the ``autograd.Function`` joining them (all the math in its docstring);
- ``configs.py``: every block config and strategy a launch can pick (and how to force one:
  ``TIED_LORA_STRATEGY``, ``TIED_LORA_TMA``, ``TIED_LORA_SPLIT_REDUCE``, ``TIED_LORA_SPLIT_RANK``,
  ``configs.forced``);
  ``compile_check.py`` compiles each for the GPUs its table serves (sm_90 and sm_100; sm_80 and sm_120);
- ``common.py``: dot precision, the interpreter's bf16 workaround, the host ``cdiv``.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Any

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
zero spills included (README, Install)."""


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
        return hopper_ptxas() if major == 9 else None
    if device.type == "cpu" and interpreting():
        return None
    return f"the kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got a {device.type} tensor"


FIXED_HOPPER_PTXAS = (13, 3)
"""ptxas 12.9 (and, until NVIDIA's fix in CUDA 13.3, the releases after it) can reuse the registers of a Hopper
``wgmma`` whose ``A`` operand comes from registers before the asynchronous ``wgmma`` has read them, corrupting the
product (triton PR 11781). Every 16-bit prefill GEMM here has such a ``wgmma``: the rank-R term's dot, whose ``t``
is computed in registers (``compile_check``'s ``wgmma_register_a`` counts them). Triton 3.8 assembles Hopper
kernels with ptxas 12.9; 3.9 with its newer bundled ``ptxas-blackwell``; 3.4-3.7 with 12.8 (not known to be
affected; the GPU parity tests check it on the GPU image's triton 3.6)."""


def hopper_ptxas() -> str | None:
    """Make sure the kernels are assembled for Hopper (sm_90) by a ptxas that does not corrupt them
    (``FIXED_HOPPER_PTXAS``); the first call decides, for the whole process. When triton would use an affected
    ptxas and bundles a fixed one (triton 3.8: ``ptxas-blackwell`` 13.3), that one is made triton's ``ptxas``
    (``TRITON_PTXAS_PATH``, as triton 3.9 does for Hopper), with a warning. Returns why the kernels cannot run on
    Hopper when it cannot do that (``TRITON_PTXAS_PATH`` set to an affected ptxas, or no fixed one at hand), else
    None. ``unavailable_reason`` calls it for a Hopper device, before any kernel is compiled there."""
    return _hopper_ptxas()


@functools.cache
def _hopper_ptxas() -> str | None:
    risk, newer, problem = _hopper_ptxas_choice(_driver_cuda())
    if newer is None:
        if problem is not None:  # (said once: backend="auto" runs the torch path on Hopper without a word otherwise)
            warnings.warn(
                f"tied_lora_kernels: {problem}. Until then the fused kernels do not run on Hopper in this process "
                "(backend='auto' runs the torch path)",
                stacklevel=_user_stacklevel(),
            )
        return problem
    from triton.backends.nvidia import compiler

    os.environ["TRITON_PTXAS_PATH"] = newer.path
    # triton's cached ptxas version is part of its cache key: from now on the new one's
    clear = getattr(getattr(compiler, "get_ptxas_version", None), "cache_clear", None)
    if callable(clear):
        clear()
    warnings.warn(
        f"tied_lora_kernels: {risk}. This process now assembles with triton's bundled ptxas {newer.version} "
        f"(TRITON_PTXAS_PATH={newer.path}), as triton 3.9 does for Hopper; set TRITON_PTXAS_PATH to choose "
        "another",
        stacklevel=_user_stacklevel(),
    )
    return None


def _hopper_ptxas_choice(driver: tuple[int, ...] | None) -> tuple[str | None, Any, str | None]:
    """``(risk, newer, problem)`` for ``hopper_ptxas``, changing nothing (the compile check assembles its sm_90 rows
    as a launch will): ``risk`` says how the ptxas triton would assemble Hopper kernels with can corrupt them (all
    three None when it cannot); ``newer`` is the bundled ptxas to use instead (a ``NvidiaTool``), else None and
    ``problem`` says why the kernels cannot run on Hopper. ``driver``: the CUDA version the NVIDIA driver supports
    (``_driver_cuda``), which must be of the newer ptxas's major version to load what it builds (None: not
    checked)."""
    import triton
    from triton.backends.nvidia import compiler

    current = _ptxas(compiler, 90)
    if not (12, 9) <= release(current.version) < FIXED_HOPPER_PTXAS:
        return None, None, None
    risk = (
        f"triton {triton.__version__} assembles Hopper kernels with ptxas {current.version}, which can corrupt a "
        "wgmma whose A operand comes from registers, as the fused GEMMs' rank-R term is (triton PR 11781; fixed "
        f"in CUDA {'.'.join(map(str, FIXED_HOPPER_PTXAS))})"
    )
    fixed = f"ptxas >= {'.'.join(map(str, FIXED_HOPPER_PTXAS))}"
    for name in ("TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH"):  # (triton >= 3.9 takes Hopper's from the second)
        if os.environ.get(name) and os.path.realpath(os.environ[name]) == os.path.realpath(current.path):
            return risk, None, f"{risk}, and {name} chose it: point {name} at a {fixed}, or unset it"
    newer = _bundled_ptxas()
    if newer is None or release(newer.version) < FIXED_HOPPER_PTXAS:
        return risk, None, f"{risk}: set TRITON_PTXAS_PATH to a {fixed} (CUDA's), or install triton >= 3.9"
    needs = release(newer.version)[0]
    if driver is not None and driver[0] < needs:
        old_driver = (
            f"triton's fixed ptxas {newer.version} builds kernels that need a driver for CUDA {needs} and this "
            f"NVIDIA driver is for CUDA {'.'.join(map(str, driver))}: update the driver (R580 or newer for CUDA "
            "13), or install triton <= 3.7 (ptxas 12.8)"
        )
        return risk, None, f"{risk}: {old_driver}"
    return risk, newer, None


def _driver_cuda() -> tuple[int, ...] | None:
    """The CUDA version the NVIDIA driver supports (``cuDriverGetVersion``: ``(12, 8)``), or None where there is no
    driver to ask."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1" if sys.platform == "linux" else "nvcuda.dll")
        version = ctypes.c_int()
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return version.value // 1000, version.value % 1000 // 10


def _user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the function calling this one that names the first frame outside
    this package and torch: the user's line (the dispatcher, ``nn.Module`` or a launcher may be between)."""
    inside = (os.path.dirname(os.path.dirname(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _ptxas(compiler: Any, arch: int) -> Any:
    """The ptxas triton assembles for ``arch`` with (a ``NvidiaTool``: ``path``, ``version`` as ``"12.9"``)."""
    try:
        return compiler.get_ptxas(arch)  # triton >= 3.6
    except TypeError:
        return compiler.get_ptxas()


def _bundled_ptxas() -> Any:
    """Triton's newer bundled ptxas (``ptxas-blackwell``, triton >= 3.6), or None."""
    from triton import knobs

    try:
        return knobs.nvidia.ptxas_blackwell
    except (AttributeError, RuntimeError):  # (RuntimeError: triton's "Cannot find ptxas-blackwell")
        return None


def tied_lora_linear_triton(x2d, weight, bias, A, B, u, v, scale: float, *, deterministic: bool, dropout: float = 0.0):
    """The triton backend of ``tied_lora_linear`` on 2-D ``x`` (see ``function.py``; imports triton lazily)."""
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
