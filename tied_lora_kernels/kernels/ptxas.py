"""Which ptxas assembles the kernels for Hopper: ``hopper_ptxas`` keeps them from one that corrupts them.

ptxas 12.9, until NVIDIA's fix in CUDA 13.3, can reuse the registers of a Hopper ``wgmma`` whose ``A`` operand comes
from registers before the asynchronous ``wgmma`` has read them (triton PR 11781), and every 16-bit prefill GEMM here
has such a ``wgmma``: the rank-R term's dot (``compile_check``'s ``wgmma_register_a``). Triton 3.8 (torch 2.14's)
assembles Hopper kernels with ptxas 12.9; 3.9 with its bundled 13.4; 3.4-3.7 with 12.8 (not known to be affected).
``benchmarks/ptxas_probe.py`` measures on a Hopper GPU whether 12.9 corrupts these kernels.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import warnings
from typing import Any

import torch

from . import release

__all__ = ["hopper_ptxas", "affected", "FIRST_AFFECTED_PTXAS", "FIXED_HOPPER_PTXAS"]


FIRST_AFFECTED_PTXAS = (12, 9)
FIXED_HOPPER_PTXAS = (13, 3)
"""ptxas releases from ``FIRST_AFFECTED_PTXAS`` up to, not including, ``FIXED_HOPPER_PTXAS`` can corrupt a
register-input ``wgmma``; earlier ones are not known to (the GPU parity tests check triton 3.6's 12.8)."""


def affected(version: str) -> bool:
    """Whether a ptxas release (``"12.9"``) can corrupt a register-input ``wgmma``."""
    return FIRST_AFFECTED_PTXAS <= release(version) < FIXED_HOPPER_PTXAS


_SAFE = "a ptxas outside 12.9-13.2 (CUDA 12.8's, or 13.3 or newer)"
_DECIDING = threading.Lock()


def hopper_ptxas() -> str | None:
    """Make sure the kernels are assembled for Hopper (sm_90) by a ptxas that does not corrupt them
    (``FIXED_HOPPER_PTXAS``); the first call decides, for the whole process. When triton would use an affected
    ptxas and bundles a fixed one (triton 3.8: ``ptxas-blackwell`` 13.3), that one is made triton's ``ptxas``
    (``TRITON_PTXAS_PATH``, as triton 3.9 does for Hopper), with a warning. Returns why the kernels cannot run on
    Hopper when it cannot do that (``TRITON_PTXAS_PATH`` set to an affected ptxas, no fixed one at hand, or an NVIDIA
    driver too old to load what the fixed one builds), also said once in a warning; else None. ``unavailable_reason``
    calls it for a Hopper device, before any kernel is compiled there (and ``configs`` before a launch)."""
    with _DECIDING:  # (two threads' first launches: one decision, one warning)
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
    if not affected(current.version):
        return None, None, None
    risk = (
        f"triton {triton.__version__} assembles Hopper kernels with ptxas {current.version}, which can corrupt a "
        "wgmma whose A operand comes from registers, such as the fused GEMMs' rank-R dot (triton PR 11781; fixed "
        f"in CUDA {'.'.join(map(str, FIXED_HOPPER_PTXAS))})"
    )
    for name in ("TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH"):  # (triton >= 3.9 takes Hopper's from the second)
        if os.environ.get(name) and os.path.realpath(os.environ[name]) == os.path.realpath(current.path):
            return risk, None, f"{risk}, and {name} chose it: point {name} at {_SAFE}, or unset it"
    newer = _bundled_ptxas()
    if newer is None or release(newer.version) < FIXED_HOPPER_PTXAS:
        return risk, None, f"{risk}: set TRITON_PTXAS_PATH to {_SAFE}"
    needs = release(newer.version)[0]
    if driver is not None and driver[0] < needs:
        old_driver = (
            f"triton's fixed ptxas {newer.version} builds kernels that need a driver for CUDA {needs} and this "
            f"NVIDIA driver is for CUDA {'.'.join(map(str, driver))}: update the driver (R580 or newer for CUDA "
            "13), or set TRITON_PTXAS_PATH to CUDA 12.8's ptxas"
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
    """The newer ptxas triton ships (``bin/ptxas-blackwell``, triton >= 3.6) as a ``NvidiaTool``, or None: the file
    itself, not what ``TRITON_PTXAS_BLACKWELL_PATH`` may point triton's knob at."""
    import triton
    from triton.knobs import NvidiaTool

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    return NvidiaTool.from_path(path) if os.path.isfile(path) else None  # (triton 3.4's from_path raises there)
