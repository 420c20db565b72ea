"""Test session set-up: without a GPU, triton kernels run in triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection time.

The ahead-of-time compile check (``tests/test_kernels_compile.py``: every kernel config for every GPU target,
~7 minutes of two processes on the 2-core CI machine, over half the suite) starts in the background as soon as
collection shows the run needs it, and the tests that read its rows go last: the rest of the suite runs
meanwhile.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata

import numpy
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tied_lora_kernels import kernels  # noqa: E402 (after TRITON_INTERPRET; imports no triton itself)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_configure(config):
    # the kernels need MIN_TRITON (unavailable_reason refuses older ones): say so once, rather than in each of
    # hundreds of kernel tests. And triton 3.6's interpreter converts size-1 arrays to Python ints, which numpy 2.4
    # turned into an error (loops with a runtime bound crash in every kernel); triton 3.8 fixed it
    try:
        installed = metadata.version("triton")
    except metadata.PackageNotFoundError:
        return
    triton = kernels.release(installed)
    if triton < kernels.MIN_TRITON:
        pytest.exit(
            f"triton {installed} cannot compile the kernels: install triton>="
            f"{'.'.join(map(str, kernels.MIN_TRITON))} to run the tests",
            returncode=4,
        )
    if kernels.interpreting() and triton < (3, 8) and kernels.release(numpy.__version__) >= (2, 4):
        pytest.exit(
            f"triton {installed}'s CPU interpreter crashes with numpy {numpy.__version__}: "
            "install numpy<2.4 (or triton>=3.8) to run the kernel tests without a GPU",
            returncode=4,
        )


class _CompileCheck:
    """``python -m tied_lora_kernels.kernels.compile_check`` running in a subprocess of its own (its own session, so
    that ``stop`` stops its compile workers too; it and they are killed when their parent dies, however it dies),
    ``TRITON_INTERPRET`` unset (the interpreter cannot compile)."""

    TIMEOUT_S = 1800  # a bound on a hang: 737 s with its two jobs on one core of the 2-core VM

    def __init__(self):
        from tied_lora_kernels.kernels.compile_check import _die_with_parent

        self.proc = None
        self.dir = tempfile.mkdtemp(prefix="tied-lora-compile-check-")
        self.json, self.partial = (os.path.join(self.dir, name) for name in ("rows.json", "partial.jsonl"))
        self.stdout, self.stderr = (open(os.path.join(self.dir, name), "w+") for name in ("stdout", "stderr"))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        # one per core, 2 at least (the check is the suite's long pole), 8 at most (a container may count the host's
        # cores, and each job holds its own torch and triton)
        jobs = min(8, max(2, os.cpu_count() or 1))
        command = ["--jobs", str(jobs), "--json", self.json, "--partial", self.partial]
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tied_lora_kernels.kernels.compile_check", *command],
                env=env,
                stdout=self.stdout,
                stderr=self.stderr,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except BaseException:
            self.stop()
            raise

    def rows(self) -> list[dict]:
        assert self.proc is not None
        try:
            returncode = self.proc.wait(timeout=max(0.0, self.TIMEOUT_S - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the compile check ran past {self.TIMEOUT_S} s")
        self.stdout.seek(0)
        print(self.stdout.read())
        self.stderr.seek(0)
        assert os.path.exists(self.json), (
            f"compile check produced no rows (exit {returncode}):\n{self.stderr.read()[-4000:]}"
        )
        with open(self.json) as f:
            rows = json.load(f)
        # --partial: the same rows, one line each as its compile finished (what a time limit leaves)
        with open(self.partial) as f:
            finished = [json.loads(line) for line in f.read().splitlines()]
        assert sorted(map(json.dumps, finished)) == sorted(map(json.dumps, rows))
        return rows

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.stdout.close()
        self.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_COMPILE_CHECK = pytest.StashKey["_CompileCheck | Exception"]()


def pytest_collection_finish(session):
    # session.items as they will run, after every hook that selects or orders them (-k, -m, --lf, --ff, ...): the
    # tests that read the compile check go last, and it starts now, so that the rest of the suite runs alongside it.
    # Not for a run that runs no test (--collect-only, --setup-plan), nor in a process that runs a share of the
    # tests (pytest-xdist's workers; benchmarks/parallel_pytest.py's): there a test that needs it starts it
    reading = [item for item in session.items if "compile_check_rows" in getattr(item, "fixturenames", ())]
    option = session.config.option
    if not reading or option.collectonly or getattr(option, "setupplan", False):
        return
    if os.environ.get("PYTEST_XDIST_WORKER") or os.environ.get("PYTEST_QUEUE"):
        return
    session.items[:] = [item for item in session.items if item not in reading] + reading
    try:
        session.config.stash[_COMPILE_CHECK] = _CompileCheck()
    except Exception as e:  # noqa: BLE001 (the tests that need it fail with this, not the whole session)
        session.config.stash[_COMPILE_CHECK] = e


def pytest_sessionfinish(session):
    check = session.config.stash.get(_COMPILE_CHECK, None)
    if isinstance(check, _CompileCheck):
        check.stop()


@pytest.fixture(scope="session")
def compile_check_rows(request):
    """The compile check's rows, one per (config, launch variant, target), waiting for the background run."""
    check = request.config.stash.get(_COMPILE_CHECK, None)
    if check is None:  # (not started at collection: see pytest_collection_finish)
        check = request.config.stash[_COMPILE_CHECK] = _CompileCheck()
    if isinstance(check, Exception):
        pytest.fail(f"the compile check did not start: {type(check).__name__}: {check}")
    return check.rows()


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group (CPU): enough for DDP's reducer, which counts on each hook firing once, and for
    FSDP2."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()
