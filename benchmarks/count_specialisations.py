"""How much JIT compiling a test run would cost on a GPU, counted on a CPU: the kernel specialisations its
tests launch, and the busiest process's share of compiling them when ``parallel_pytest`` runs the tests as N
processes sharing a queue (a simulation).

    python -m benchmarks.count_specialisations -n 8,16 -- tests/test_kernels_parity.py tests/test_kernels_autograd.py

Why: ``gpu_check.sh`` gives its parity phase a fixed time, and on a cold GPU machine that time is mostly
compiling, which triton's CPU interpreter never does, so no CPU dry run shows it. This runs the tests under the
interpreter and records each launch's specialisation key as the GPU JIT would form it: the kernel, its
constexprs and launch options, each tensor's dtype and 16-byte alignment, each int's width, equality to 1 and
divisibility by 16. Each key costs ``COMPILE_SECONDS`` of one core (sm_90 compiles timed on the CPU machine
with ``compile_check --jobs 1``; a GPU machine's cores may differ). The simulation hands the tests out in
order, one at a time, to whichever process is free, and a key compiles unless a process has finished it
already (the shared on-disk cache); running a test costs nothing else.
"""

from __future__ import annotations

import argparse
import heapq
import inspect
import os
import sys
from collections import Counter

import pytest

COMPILE_SECONDS = {"_fused_lora_mm_kernel": 1.4, "_rank_grad_kernel": 0.8, "_shrink_kernel": 0.55}
"""One sm_90 compile on the CPU machine, per kernel (16-bit prefill fused configs; the rest are smaller)."""
OTHER_SECONDS = 0.3
"""The element-wise kernels' (prepare, the split-K sums, dropout)."""


class Recorder:
    """pytest plugin: the specialisation keys each test launches (``keys``: nodeid -> set, in run order)."""

    def __init__(self):
        self.keys: dict[str, set[tuple]] = {}
        self.launches = 0
        self._test = ""

    @pytest.hookimpl(tryfirst=True)  # (before the fixtures' set-up, which may launch kernels too)
    def pytest_runtest_setup(self, item):
        self._test = item.nodeid
        self.keys.setdefault(item.nodeid, set())

    def install(self) -> None:
        import triton
        from triton.runtime import interpreter

        if "run" not in vars(interpreter.InterpretedFunction):  # (triton < 3.6 launches from __getitem__)
            raise SystemExit(
                f"count_specialisations needs triton >= 3.6's interpreter, not triton {triton.__version__}"
            )
        run, recorder = interpreter.InterpretedFunction.run, self

        def recording_run(fn, *args, grid, warmup, **kwargs):
            recorder.launches += 1
            recorder.keys.setdefault(recorder._test, set()).add(specialisation(fn.fn, args, kwargs))
            return run(fn, *args, grid=grid, warmup=warmup, **kwargs)

        interpreter.InterpretedFunction.run = recording_run


def specialisation(fn, args, kwargs) -> tuple:
    """The GPU JIT's cache key of one launch of the kernel ``fn``, as far as it depends on the arguments."""
    import torch

    params = inspect.signature(fn).parameters
    bound = {**dict(zip(params, args, strict=False)), **kwargs}  # (trailing parameters by keyword)
    parts: list[tuple] = [(fn.__name__,)]
    for name, param in params.items():
        if name not in bound:
            continue
        value = bound[name]
        if "constexpr" in str(param.annotation):
            parts.append((name, repr(value)))
        elif isinstance(value, torch.Tensor):
            parts.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
        elif isinstance(value, bool) or value is None or isinstance(value, float):
            parts.append((name, type(value).__name__))
        elif isinstance(value, int):
            parts.append((name, abs(value) >= 2**31, value == 1, value % 16 == 0))
        else:
            parts.append((name, type(value).__name__))
    parts += [(k, kwargs[k]) for k in ("num_warps", "num_stages") if k in kwargs]
    return tuple(parts)


def busiest(order: list[set[tuple]], processes: int) -> float:
    """Seconds of compiling in the busiest of ``processes`` that take the tests (each a set of keys, in order)
    from a queue one at a time, sharing what each has compiled once it is done."""
    ready: dict[tuple, float] = {}  # key -> when its compile finished
    free = [(0.0, p) for p in range(processes)]
    for keys in order:
        now, p = heapq.heappop(free)
        for key in sorted(keys, key=repr):
            if ready.get(key, float("inf")) > now:
                now += COMPILE_SECONDS.get(key[0][0], OTHER_SECONDS)
                ready[key] = min(ready.get(key, float("inf")), now)
        heapq.heappush(free, (now, p))
    return max(t for t, _ in free)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--processes", default="8,16", help="process counts to simulate, e.g. 8,16")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: the pytest arguments")
    args = p.parse_args(argv)
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    counts = [int(n) for n in args.processes.split(",")]
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("triton was imported before TRITON_INTERPRET=1 could be set")
    os.environ["TRITON_INTERPRET"] = "1"  # (before triton is imported: the launches run on CPU tensors)
    recorder = Recorder()
    recorder.install()
    status = pytest.main(["-q", "-p", "no:randomly", *pytest_args], plugins=[recorder])
    order = list(recorder.keys.values())
    distinct = set().union(*order) if order else set()
    per_kernel = Counter(key[0][0] for key in distinct)
    total = sum(COMPILE_SECONDS.get(k, OTHER_SECONDS) * n for k, n in per_kernel.items())
    print(f"\n{len(order)} tests, {recorder.launches} launches, {len(distinct)} distinct specialisations")
    for kernel, n in per_kernel.most_common():
        print(f"  {n:5d}  {kernel}")
    print(f"compiling all of them: ~{total:.0f} s of one core (COMPILE_SECONDS)")
    for n in counts:
        print(f"busiest of {n} queue processes: ~{busiest(order, n):.0f} s of compiling")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
