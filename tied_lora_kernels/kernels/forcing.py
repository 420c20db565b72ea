"""How benchmarks, tests and the environment override the choices ``configs.py`` makes for a launch: its
strategy, split-K, loads, who sums the split-K partials and where one-pass split-K computes its rank-R term.

**Forcing** (benchmarks, tests): ``TIED_LORA_STRATEGY=one_pass|two_pass|auto``, ``TIED_LORA_TMA=0|1|auto``,
``TIED_LORA_SPLIT_REDUCE=launch|kernel|auto`` and ``TIED_LORA_SPLIT_RANK=apart|in_tile|auto`` in the environment,
or the ``forced(strategy=..., split_k=..., tma=..., reduce=..., split_rank=...)`` context manager (it beats the
environment). The autograd Function reads the forced strategy, split and loads when its forward runs and uses
them again in its backward (the split-K sum and ``split_rank`` are read at each launch: the first does not
change results, the second only their rounding).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from numbers import Integral
from typing import Any

from .configs import DEFAULT_SPLIT_RANK, DEFAULT_SPLIT_REDUCE, SPLIT_RANKS, SPLIT_REDUCES, STRATEGIES, _check_choice

__all__ = [
    "STRATEGY_ENV",
    "TMA_ENV",
    "SPLIT_REDUCE_ENV",
    "SPLIT_RANK_ENV",
    "forced",
    "forced_choice",
    "split_reduce",
    "split_rank",
]

STRATEGY_ENV = "TIED_LORA_STRATEGY"
"""Environment variable forcing the strategy: ``one_pass``, ``two_pass`` or ``auto`` (the table; default)."""
TMA_ENV = "TIED_LORA_TMA"
"""Environment variable forcing the fused GEMM's loads: ``1`` TMA where possible, ``0`` pointers, ``auto``."""
SPLIT_REDUCE_ENV = "TIED_LORA_SPLIT_REDUCE"
"""Environment variable choosing who sums split-K partials: ``launch``, ``kernel`` or ``auto`` (``split_reduce``)."""
SPLIT_RANK_ENV = "TIED_LORA_SPLIT_RANK"
"""Environment variable choosing where one-pass split-K computes the rank-R term: ``apart``, ``in_tile`` or
``auto`` (``split_rank``)."""


# ---------------------------------------------------------------------------------------------------------
# forcing a strategy, a split or the loads (benchmarks, tests)

_FORCED: dict[str, Any] = {"strategy": None, "split_k": None, "tma": None, "reduce": None, "split_rank": None}


@contextlib.contextmanager
def forced(
    strategy: str | None = None,
    split_k: int | None = None,
    tma: bool | str | None = None,
    reduce: str | None = None,
    split_rank: str | None = None,
) -> Iterator[None]:
    """Within the block, launches use ``strategy`` ("one_pass" / "two_pass"), in 16-bit decode at most ``split_k`` K
    slices (at most ``configs.GRID_Y_MAX``; fewer where slices of whole ``BLOCK_K`` steps need fewer; ignored
    elsewhere), TMA loads where ``tma`` is True and they can run (False: pointer loads), split-K partials summed by
    ``reduce`` ("launch" / "kernel") and one-pass split-K's rank-R term computed ``split_rank`` ("apart" /
    "in_tile"). ``"auto"`` (``strategy``, ``tma``, ``reduce``, ``split_rank``) means the tables' default, whatever
    the environment or an enclosing ``forced`` says; None leaves that choice as it is outside the block (an enclosing
    ``forced``, else the environment, else the default; ``split_k``: ``configs.split_k_for``'s choice). Not
    thread-safe."""
    given: dict[str, object] = {}
    if strategy is not None:
        given["strategy"] = _check_choice(strategy, STRATEGIES, "strategy") or _AUTO
    if split_k is not None:
        if isinstance(split_k, bool) or not isinstance(split_k, Integral):  # (numpy's ints are Integral)
            raise TypeError(f"split_k must be an int or None, got {split_k!r}")
        if split_k < 1:
            from tied_lora_kernels.functional import shown

            raise ValueError(f"split_k must be >= 1, got {shown(split_k)}")
        given["split_k"] = int(split_k)
    if tma is not None:
        if not isinstance(tma, bool) and tma != _AUTO:
            raise TypeError(f"tma must be True, False, 'auto' or None, got {tma!r}")
        given["tma"] = tma
    if reduce is not None:
        given["reduce"] = _check_choice(reduce, SPLIT_REDUCES, "reduce") or _AUTO
    if split_rank is not None:
        given["split_rank"] = _check_choice(split_rank, SPLIT_RANKS, "split_rank") or _AUTO
    saved = dict(_FORCED)
    _FORCED.update(given)
    try:
        yield
    finally:
        _FORCED.update(saved)


_AUTO = "auto"
"""What ``forced`` records for an explicit "auto": the default, beating the environment."""


_ENVIRONMENT = {
    "strategy": (STRATEGY_ENV, STRATEGIES),
    "tma": (TMA_ENV, ("0", "1")),
    "reduce": (SPLIT_REDUCE_ENV, SPLIT_REDUCES),
    "split_rank": (SPLIT_RANK_ENV, SPLIT_RANKS),
}
"""Each forcible choice's environment variable and the values it takes (besides "auto")."""


def _forced_or_env(name: str) -> Any:
    """A choice forced now (None for a forced "auto"), else its environment variable's value (None: unset or
    "auto")."""
    value = _FORCED[name]
    if value is None:
        env, choices = _ENVIRONMENT[name]
        return _check_choice(_getenv(env), choices, env)
    return None if value == _AUTO else value


def _getenv(name: str) -> str | None:
    """``os.environ.get(name)`` at a dict lookup's cost: ``os.environ`` encodes the key and raises and catches a
    KeyError for an unset variable, about a microsecond a read, and a decode step reads up to six (a tenth of
    the library's host time there). Reads the mapping ``os.environ`` keeps in step with every change made
    through it (``os.environ[...] = ``, ``setenv`` in tests), with ``os.environ.get`` as the fallback where
    that mapping is not there (it is CPython's, ``os._Environ``) or ``os.environ`` was replaced. (A mock of
    ``os.environ.get`` itself is not seen; ``mock.patch.dict(os.environ, ...)`` is.)"""
    key = _ENV_KEYS.get(name)
    if key is None or _ENV_DATA is None or os.environ is not _ENVIRON:
        return os.environ.get(name)
    raw = _ENV_DATA.get(key)
    return None if raw is None else _ENVIRON.decodevalue(raw)  # type: ignore[attr-defined]


_ENVIRON = os.environ
_ENV_DATA: dict | None = getattr(os.environ, "_data", None)
_ENV_KEYS = (
    {env: os.environ.encodekey(env) for env, _ in _ENVIRONMENT.values()}  # type: ignore[attr-defined]
    if _ENV_DATA is not None and hasattr(os.environ, "encodekey") and hasattr(os.environ, "decodevalue")
    else {}
)


def forced_choice() -> tuple[str | None, int | None, bool | None]:
    """``(strategy, split_k, tma)`` forced now, None where the tables decide: ``forced()`` beats the environment
    (``TIED_LORA_STRATEGY``, ``TIED_LORA_TMA``). Also checks the split-K settings (``split_reduce``,
    ``split_rank``, read only by a launch that splits K), so that a bad value in the environment fails every
    triton call, not only a 16-bit decode."""
    for checked_only in ("reduce", "split_rank"):
        _forced_or_env(checked_only)
    tma = _forced_or_env("tma")
    return _forced_or_env("strategy"), _FORCED["split_k"], tma == "1" if isinstance(tma, str) else tma


def split_reduce() -> str:
    """Who sums the fused GEMM's split-K partials (decode): ``"launch"``, a second kernel over the partials, or
    ``"kernel"``, the last of each output tile's K slices to finish (an arrival count per tile), in the GEMM's
    own launch. Both add the partials in slice order, so their results are equal bit for bit; "kernel" saves
    a launch per decode GEMM. ``forced(reduce=...)``, else ``TIED_LORA_SPLIT_REDUCE``, else
    ``DEFAULT_SPLIT_REDUCE``: "launch" until a GPU has timed both (provider ``triton-1launch``) and run the
    in-kernel sum's GPU tests. Read at every launch (forward and backward each read it when they run; under
    ``torch.compile``, when the compiled graph runs), which is safe since the results do not depend on it."""
    return _forced_or_env("reduce") or DEFAULT_SPLIT_REDUCE


def split_rank() -> str:
    """Where one-pass split-K (decode) computes its rank-R term when a second launch sums the partials
    (``split_reduce() == "launch"``; the in-kernel sum always has it in the tiles): ``"apart"``, ``t`` computed
    once per K slice by programs of their own in the GEMM's launch and expanded by the sum launch, which reads
    ``down`` and ``up`` once; or ``"in_tile"``, each output tile's programs computing their slice's ``t`` and
    expanding it (``down`` read once per column tile, ``up`` once per slice). The two round differently (apart
    rounds the complete ``t`` once, as an unsplit launch does; in-tile each slice's ``t`` as a hi + lo pair),
    so their results are close, not equal. ``forced(split_rank=...)``, else ``TIED_LORA_SPLIT_RANK``, else
    ``DEFAULT_SPLIT_RANK``: "apart", an estimate from bytes moved (``configs.py``'s module docstring), unmeasured.
    "apart" holds only where the sum launch's int32 offsets reach ``t`` and ``up``
    (``split_sum.rank_sum_fits_int32``; past 2³¹ elements the launch keeps the rank-R term in the tiles). Read at
    every launch, like ``split_reduce``: forward and backward each read it when they run."""
    return _forced_or_env("split_rank") or DEFAULT_SPLIT_RANK
