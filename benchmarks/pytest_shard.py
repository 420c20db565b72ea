"""pytest plugin: keep one contiguous slice of the collected tests, so N processes can split a run.

    PYTEST_SHARD=2/8 python -m pytest -p benchmarks.pytest_shard tests/...   # the 3rd of 8 slices (0-based)

Slices are contiguous, not round-robin: neighbouring tests share kernel specialisations, so each process
JIT-compiles about 1/N of them and a cold run's compile time divides by N (``benchmarks/parallel_pytest.py``
starts the processes). Runs last, after every other deselection (e.g. the benchmarks' ``slow`` tier).
"""

from __future__ import annotations

import os

import pytest

ENV = "PYTEST_SHARD"


def parse(spec: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; a clear error otherwise."""
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ValueError(f"{ENV} must read 'INDEX/COUNT' (e.g. 0/4), got {spec!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"{ENV}={spec!r}: need 0 <= INDEX < COUNT")
    return index, count


def bounds(index: int, count: int, total: int) -> tuple[int, int]:
    """The ``[start, stop)`` of slice ``index`` of ``count`` over ``total`` items (sizes differ by <= 1)."""
    return index * total // count, (index + 1) * total // count


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    spec = os.environ.get(ENV)
    if not spec:
        return
    start, stop = bounds(*parse(spec), len(items))
    drop = items[:start] + items[stop:]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = items[start:stop]
