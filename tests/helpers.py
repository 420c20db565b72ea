"""One tolerance rule for every parity test (style.md): a result's error against the float64 reference may
be at most twice the error plain PyTorch makes in the same dtype, plus a small dtype-scaled atol."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from tied_lora_kernels import kernels

cpu_triton = pytest.mark.skipif(
    not kernels.interpreting(),
    reason="runs backend='triton' on CPU tensors, in triton's interpreter (TRITON_INTERPRET=1, set by conftest "
    "when there is no GPU); with a GPU the kernel tests run the kernels on it",
)
"""For tests of the model helpers that run the triton path on CPU models: skipped where a GPU is present."""

# atol relative to the largest magnitude of the expected tensor
ATOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def max_error(actual: Tensor, expected: Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0


def error_and_bound(
    actual: Tensor, expected: Tensor, baseline: Tensor | None, dtype: torch.dtype
) -> tuple[float, float, float, float]:
    """``(error, baseline error, magnitude, bound)`` of ``actual`` against ``expected`` by the rule above."""
    magnitude = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    err = max_error(actual, expected)
    base_err = 0.0 if baseline is None else max_error(baseline, expected)
    return err, base_err, magnitude, 2.0 * base_err + ATOL[dtype] * magnitude


def assert_close_to_reference(
    actual: Tensor, expected: Tensor, baseline: Tensor | None, name: str, dtype: torch.dtype | None = None
) -> None:
    """``actual`` vs ``expected`` (float64 ground truth); ``baseline`` is plain PyTorch in ``dtype``."""
    dtype = dtype or actual.dtype
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err, base_err, magnitude, bound = error_and_bound(actual, expected, baseline, dtype)
    assert err <= bound, (
        f"{name} ({dtype}): max abs error {err:.3e} > bound {bound:.3e} "
        f"(2 × baseline error {base_err:.3e} + atol {ATOL[dtype]:.1e} × magnitude {magnitude:.3e})"
    )


class GridSpy:
    """Stands in for a kernel (``monkeypatch.setattr(module, name, GridSpy(kernel))``): records each launch grid,
    then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def programs_reversed(monkeypatch, axes: tuple[int, ...] = (0, 1, 2)) -> None:
    """Make triton's interpreter run every grid's programs last to first along ``axes`` (it runs them one at a time,
    in order; a GPU runs them in any order). Skips where the interpreter has no grid-index hook."""
    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)
    if not hasattr(type(builder), "set_grid_idx"):
        pytest.skip("this triton's interpreter has no grid-index hook to reverse")
    original = type(builder).set_grid_idx

    def reversed_index(b, *index):
        sizes = b.grid_dim
        return original(b, *(sizes[axis] - 1 - i if axis in axes else i for axis, i in enumerate(index)))

    monkeypatch.setattr(type(builder), "set_grid_idx", reversed_index)
