"""Run one pytest invocation as N processes that share its tests through a queue (``pytest_queue.py``).

    python -m benchmarks.parallel_pytest -n 16 -- tests/test_kernels_parity.py -x -q

Why: a cold GPU run JIT-compiles about a thousand kernel specialisations, about a second each on one CPU core,
which is most of a parity run's time; N processes on N cores compile in parallel (the triton cache is shared
on disk). The tests share the GPU, which parity tests do not mind — never use this for timings. The default
is one process per core, at most 16: compiling is one core's work per process.

Each process writes its own log; when all have finished (or on SIGTERM/SIGINT, e.g. from ``timeout``, which stops
them all) the logs are printed in process order, with one summary line per process, a count of the tests run against
those collected, the tests started but never finished (what a time limit interrupted, or what a process died in),
and apart from them the ones those processes had taken next and never started. Exit status: 0 when every process
passed or had nothing to run (pytest's 5) and every collected test ran, else the first failing process's status (1
when tests were not run, 124 when stopped).
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

from benchmarks import pytest_queue

NO_TESTS = 5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--processes", type=int, default=max(1, min(16, os.cpu_count() or 1)))
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: the pytest arguments")
    args = p.parse_args(argv)
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    if args.processes < 1:
        p.error("--processes must be at least 1")

    n = args.processes
    work = Path(tempfile.mkdtemp(prefix="parallel_pytest_"))
    queue = work / "queue"
    queue.mkdir()
    procs, files = [], []
    start = time.monotonic()
    for i in range(n):
        f = open(work / f"process{i}.log", "w+")  # noqa: SIM115 (closed below)
        env = {**os.environ, pytest_queue.ENV: str(queue)}
        # every process must collect the tests in the same order: no random-order plugin
        cmd = [sys.executable, "-m", "pytest", "-p", "benchmarks.pytest_queue", "-p", "no:randomly", *pytest_args]
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
                print(f"parallel_pytest: process {i}/{n} exit {rc} after {time.monotonic() - start:.0f}s", flush=True)
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
        print(f"\n----- process {i}/{n} (exit {codes[i]}) -----\n{texts[i]}")
    print()
    for i, text in enumerate(texts):
        last = (text.splitlines() or ["(no output)"])[-1]
        print(f"process {i}/{n}: exit {codes[i]:>3}  {last}")
    ids = pytest_queue.collected(queue)
    run = len(pytest_queue.finished(queue))
    lost = pytest_queue.unfinished(queue)
    if ids is not None:  # (None: nothing was published, e.g. --collect-only)
        print(f"parallel_pytest: {run} of {len(ids)} collected tests run")
    if lost:  # what a time limit stopped, or a process died in (an abort, the OOM killer)
        print(f"parallel_pytest: {len(lost)} started but never finished:")
        print("\n".join(f"    {nodeid}" for nodeid in lost))
    queued = pytest_queue.not_started(queue)
    if queued:  # (each the next test of a process that stopped in the one before: not run, not to blame)
        print(f"parallel_pytest: {len(queued)} taken next by those processes, never started:")
        print("\n".join(f"    {nodeid}" for nodeid in queued))
    shutil.rmtree(work, ignore_errors=True)
    if stopped:
        print(f"parallel_pytest: stopped by signal {stopped[0]}")
        return 124
    bad = [c for c in codes if c not in (0, NO_TESTS)]
    if bad:
        return bad[0]
    if lost or (ids is not None and run != len(ids)):  # (a process that died with status 0, or a lost test)
        print(f"parallel_pytest: {len(ids or []) - run} collected tests were not run")
        return 1
    return NO_TESTS if all(c == NO_TESTS for c in codes) else 0


if __name__ == "__main__":
    sys.exit(main())
