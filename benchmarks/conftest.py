"""Benchmark session set-up: device, markers, the default tier, and an optional time budget.

- The grid follows the device: CUDA present -> real model shapes in fp16/bf16 (marked ``gpu``); otherwise
  scaled-down shapes in fp32 on CPU.
- Heavy cases carry ``slow`` and are left out unless the ``-m`` expression names ``slow``:
  ``-m "slow or not slow"`` runs the full grid. (``-m slow`` alone runs only the slow cases, without the
  ``nn.Linear`` floors they share with the default tier: on GPU their ratios then read "-".)
- ``BENCH_TIME_BUDGET_S=<seconds>``: once a session has run that long, the remaining benchmarks are
  skipped (with that reason), so a time-limited run such as gpu_check.sh still writes its JSON.
- CPU runs use one thread (``BENCH_CPU_THREADS`` to change): on a shared machine, a parallel region waits
  for its slowest thread, and one descheduled thread turned 50 µs matmuls into 4 ms stalls.
- ``pytest benchmarks --benchmark-disable`` is the smoke run: every case runs once, untimed.
- Timed CUDA runs start with a second of matmuls (``_gpu_busy_first``), so that the GPU's clocks are up.
- SIGTERM (``timeout`` ending a phase of gpu_check.sh) interrupts the session like Ctrl-C, so pytest finishes
  it and pytest-benchmark still writes the JSON of what ran (killed outright, it writes nothing).
- A CUDA test that fails and leaves the process's CUDA context broken (an illegal memory access is sticky: every
  later test would fail, the baselines too) ends the session after it (exit code 2, the JSON written); in
  gpu_check.sh's parallel warm-up the other processes carry on.
- ``BENCH_BROKEN_LOG=<file>``: the id of each test after which the CUDA context was broken is appended to it
  (gpu_check.sh's timed runs leave out those of its warm-up; other failures, an out-of-memory among its parallel
  processes say, are timed again).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from benchmarks import pytest_queue

HERE = Path(__file__).resolve().parent
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_START = time.monotonic()
if DEVICE.type == "cpu":
    torch.set_num_threads(int(os.environ.get("BENCH_CPU_THREADS", "1")))


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _interrupt)


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end training step of a small transformers model")
    for line in config.getini("markers"):
        if line.startswith(("slow:", "gpu:")):
            break
    else:  # run from a tree whose pyproject does not register them
        config.addinivalue_line("markers", "slow: heavy benchmark cases (select with -m slow)")
        config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.option.markexpr or ""):
        return
    keep, drop = [], []
    for item in items:
        ours = HERE in Path(str(item.path)).resolve().parents
        (drop if ours and item.get_closest_marker("slow") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _time_budget():
    budget = os.environ.get("BENCH_TIME_BUDGET_S")
    if budget and time.monotonic() - _START > float(budget):
        pytest.skip(f"BENCH_TIME_BUDGET_S={budget} spent")


@pytest.fixture(scope="session", autouse=True)
def _gpu_busy_first(request):
    """CUDA, timed runs: a second of matmuls before the first benchmark, so that the first floor is not timed on a
    GPU still raising its clocks after the process's idle start (imports, collection)."""
    option = request.config.getoption
    if DEVICE.type != "cuda" or (option("benchmark_disable", False) and not option("benchmark_enable", False)):
        return
    a = torch.randn(4096, 4096, device=DEVICE, dtype=torch.bfloat16)
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize(DEVICE)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed or call.when == "teardown":
        return
    if DEVICE.type == "cuda":
        try:
            torch.cuda.synchronize(DEVICE)
        except RuntimeError as e:  # (torch.AcceleratorError is a RuntimeError)
            # after this test (its failure reported): pytest's loop stops at shouldstop, and a queue of processes
            # stops this one only (pytest_queue.PROCESS_ONLY)
            item.session.shouldstop = f"the CUDA context is broken after {item.nodeid} ({str(e).splitlines()[0]})"
            setattr(item.session, pytest_queue.PROCESS_ONLY, True)
            broken_log = os.environ.get("BENCH_BROKEN_LOG")
            if broken_log:
                with open(broken_log, "a") as f:
                    f.write(item.nodeid + "\n")


def pytest_benchmark_update_machine_info(config, machine_info):
    from benchmarks.timing import device_info

    machine_info["tied_lora"] = device_info(DEVICE.type)
