"""Run one pytest invocation as N processes, each on a contiguous slice of the tests (``pytest_shard.py``).

    python -m benchmarks.parallel_pytest -n 8 -- tests/test_kernels_parity.py -x -q

Why: a cold GPU run JIT-compiles a few hundred kernel specialisations, about a second each on one CPU core,
which is most of a parity run's time; N processes on N cores compile in parallel (the triton cache is shared
on disk). The tests share the GPU, which parity tests do not mind — never use this for timings.

Each process writes its own log; when all have finished (or on SIGTERM/SIGINT, e.g. from ``timeout``, which
stops them all) the logs are printed in slice order with one summary line per slice. Exit status: 0 when every
slice passed or had nothing to run (pytest's 5), else the first failing slice's status (124 when stopped).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.pytest_shard import ENV

NO_TESTS = 5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--processes", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: the pytest arguments")
    args = p.parse_args(argv)
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    if args.processes < 1:
        p.error("--processes must be at least 1")

    n = args.processes
    logs = Path(tempfile.mkdtemp(prefix="parallel_pytest_"))
    procs, files = [], []
    start = time.monotonic()
    for i in range(n):
        f = open(logs / f"slice{i}.log", "w+")  # noqa: SIM115 (closed below)
        env = {**os.environ, ENV: f"{i}/{n}"}
        # every process must collect the tests in the same order: no random-order plugin
        cmd = [sys.executable, "-m", "pytest", "-p", "benchmarks.pytest_shard", "-p", "no:randomly", *pytest_args]
        procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env))
        files.append(f)
    print(f"parallel_pytest: {n} processes: pytest {' '.join(pytest_args)}", flush=True)

    stopped = []

    def stop(signum, frame):
        stopped.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    pending = set(range(n))
    while pending:
        for i in sorted(pending):
            rc = procs[i].poll()
            if rc is not None:
                pending.discard(i)
                print(f"parallel_pytest: slice {i}/{n} exit {rc} after {time.monotonic() - start:.0f}s", flush=True)
        if stopped:
            deadline = time.monotonic() + 5
            for proc in procs:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
            break
        time.sleep(0.2)

    codes = [proc.wait() for proc in procs]
    texts = []
    for i, f in enumerate(files):
        f.seek(0)
        texts.append(f.read().strip())
        f.close()
        print(f"\n----- slice {i}/{n} (exit {codes[i]}) -----\n{texts[i]}")
    print()
    for i, text in enumerate(texts):
        last = (text.splitlines() or ["(no output)"])[-1]
        print(f"slice {i}/{n}: exit {codes[i]:>3}  {last}")
    shutil.rmtree(logs, ignore_errors=True)
    if stopped:
        print(f"parallel_pytest: stopped by signal {stopped[0]}")
        return 124
    bad = [c for c in codes if c not in (0, NO_TESTS)]
    if bad:
        return bad[0]
    return NO_TESTS if all(c == NO_TESTS for c in codes) else 0


if __name__ == "__main__":
    sys.exit(main())
