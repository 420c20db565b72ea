"""How close each parity comparison comes to its bound: a pytest plugin and its summary.

    PARITY_MARGINS=margins.jsonl python -m pytest -p benchmarks.parity_margins tests/test_kernels_parity.py
    python -m benchmarks.parity_margins margins.jsonl        # the closest comparisons, per dtype

Every parity test compares a result with the float64 reference through ``tests.helpers.assert_close_to_reference``
(error at most twice plain PyTorch's in the same dtype, plus a dtype-scaled atol). A test passes or fails; this
records, for each comparison, the error, the bound and their ratio, so a run shows its margin: on the CPU
interpreter, and on a GPU, whose rounding (accumulation order, real bf16 dots, cuBLAS as the baseline) the
interpreter only approximates. gpu_check.sh records its parity phase this way. Appends one JSON line per
comparison (processes of one ``parallel_pytest`` run share the file), then lets the real assertion run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

ENV = "PARITY_MARGINS"

_test = {"id": None}


def pytest_configure(config) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    # imported here, after the tests' conftest has set TRITON_INTERPRET where there is no GPU; test modules
    # import the helper when collected, after this, so they get the recording one
    from tests import helpers

    check = helpers.assert_close_to_reference

    def recording(actual, expected, baseline, name, dtype=None):
        row = {"test": _test["id"], "name": name, "dtype": str(dtype or actual.dtype).removeprefix("torch.")}
        try:
            err, base, _, bound = helpers.error_and_bound(actual, expected, baseline, dtype or actual.dtype)
            row.update(err=err, baseline=base, bound=bound, ratio=err / bound if bound else 0.0)
        except Exception as e:  # noqa: BLE001 (the real check below reports what is wrong)
            row.update(error=f"{type(e).__name__}: {e}"[:200])
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        check(actual, expected, baseline, name, dtype)

    helpers.assert_close_to_reference = recording


def pytest_runtest_setup(item) -> None:
    _test["id"] = item.nodeid


def summary(rows: list[dict], worst: int = 10) -> str:
    """Comparisons per dtype with their largest ratio, then the ``worst`` closest to their bounds."""
    measured = [r for r in rows if "ratio" in r]
    if not measured:
        return "parity margins: no comparison recorded"
    by_dtype: dict[str, list[float]] = defaultdict(list)
    for r in measured:
        by_dtype[r["dtype"]].append(r["ratio"])
    lines = [f"parity margins: {len(measured)} comparisons (error / bound; a test fails above 1)"]
    lines += [f"  {d:9} {len(v):5} comparisons, largest {max(v):.2f}" for d, v in sorted(by_dtype.items())]
    for r in sorted(measured, key=lambda r: -r["ratio"])[:worst]:
        lines.append(f"  {r['ratio']:.2f} {r['dtype']:9} {r['name']:12} {r['test']}")
    if len(measured) < len(rows):
        lines.append(f"  {len(rows) - len(measured)} comparisons not measured (see their 'error')")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="the JSON lines a run wrote")
    p.add_argument("--worst", type=int, default=10, help="how many of the closest comparisons to list")
    args = p.parse_args(argv)
    rows, cut = [], 0
    with open(args.path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line a killed process left half-written
                cut += bool(line.strip())
    print(summary(rows, args.worst))
    if cut:
        print(f"({cut} unreadable line{'s' * (cut > 1)} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
