"""pytest plugin: N processes share one run's tests through a queue in a directory, each taking the next test
no process has taken yet (``benchmarks/parallel_pytest.py`` starts the processes).

    PYTEST_QUEUE=/tmp/q python -m pytest -p benchmarks.pytest_queue tests/...   # in each of N processes

Why a queue and not fixed slices: a cold GPU run's time is JIT compiling (the kernel tests launch 988 kernel
specialisations in 678 tests, ~1 s each to compile on one core: ``count_specialisations.py``), and the tests
that need new ones come in runs (a test per kernel config). Fixed contiguous slices gave the busiest of 8
processes about twice an even share of the compiling; taking the tests one at a time from a queue evens it out
(the same count, simulated: 1.3x). The triton cache is shared on disk: what one process has compiled, the
others load.

Every process must collect the same tests in the same order (no random-order plugin): the first to collect
writes the list to ``DIR/collection``, the others check theirs against it and stop with an error if it
differs. A test is taken by creating ``DIR/<its index>`` (exclusive create: one process wins) and marked
started by ``DIR/<its index>.run`` and finished by ``DIR/<its index>.done``; each process takes the test after
the one it runs before running it (pytest tears fixtures down towards the next test), and walks forward through
the list, so it sets up a module's fixtures at most once. A test started and never finished (a process killed or
crashed in it, e.g. by a time limit, an abort or the OOM killer) is named by ``unfinished``, the one that
process had taken next by ``not_started``. With ``-x`` (or ``--maxfail``, counted
per process) a process that stops creates ``DIR/stop``; the others finish at most the test they run and the
one they have taken, and take nothing more. A process that stops alone (``PROCESS_ONLY``) gives back the test
it has taken and leaves the others running.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV = "PYTEST_QUEUE"
COLLECTION = "collection"
STOP = "stop"
DONE = ".done"
STARTED = ".run"
PROCESS_ONLY = "pytest_queue_process_only"
"""A session attribute: True where ``shouldstop`` stops this process and not the others (benchmarks/conftest.py,
a broken CUDA context)."""


def collected(queue: Path) -> list[str] | None:
    """The tests the processes sharing ``queue`` collected, in order (None: none has collected yet)."""
    path = queue / COLLECTION
    return path.read_text().splitlines() if path.exists() else None


def taken(queue: Path) -> set[int]:
    """The indices of the tests some process has taken."""
    return {int(p.name) for p in queue.iterdir() if p.name.isdigit()}


def finished(queue: Path) -> set[int]:
    """The indices of the tests some process has run to the end (passed, failed or skipped)."""
    return {int(p.name.removesuffix(DONE)) for p in queue.iterdir() if p.name.endswith(DONE)}


def started(queue: Path) -> set[int]:
    """The indices of the tests some process has begun to run."""
    return {int(p.name.removesuffix(STARTED)) for p in queue.iterdir() if p.name.endswith(STARTED)}


def unfinished(queue: Path) -> list[str]:
    """The tests started but never finished: a process died (or was stopped) running them."""
    ids = collected(queue) or []
    return [ids[i] for i in sorted(started(queue) - finished(queue))]


def not_started(queue: Path) -> list[str]:
    """The tests taken but never started: the next test of a process that died in the one before."""
    ids = collected(queue) or []
    return [ids[i] for i in sorted(taken(queue) - started(queue))]


def _publish(queue: Path, ids: list[str]) -> None:
    """Write ``ids`` as the queue's collection, or check them against the one already written."""
    text = "".join(f"{i}\n" for i in ids)
    tmp = queue / f".{COLLECTION}.{os.getpid()}"
    tmp.write_text(text)
    try:
        os.link(tmp, queue / COLLECTION)  # atomic: the first process's whole list, or FileExistsError
    except FileExistsError:
        if (queue / COLLECTION).read_text() != text:
            raise pytest.UsageError(
                f"{ENV}: this process collected other tests, or in another order, than the first process "
                f"({queue / COLLECTION}): the processes sharing a queue must run the same pytest arguments "
                "without a random-order plugin"
            ) from None
    finally:
        tmp.unlink()


def _take(queue: Path, start: int, total: int) -> int | None:
    """The index of the next test from ``start`` that no process has taken, now taken by this one."""
    for index in range(start, total):
        if (queue / STOP).exists():
            return None
        try:
            os.close(os.open(queue / str(index), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        return index
    return None


def _queue(config: pytest.Config) -> Path | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    queue = Path(spec)
    if not queue.is_dir():
        raise pytest.UsageError(f"{ENV}={spec!r} must name an existing directory shared by the processes")
    return queue


def pytest_collection_finish(session):
    # (after every plugin has reordered and deselected: the list this process will walk)
    queue = _queue(session.config)
    if queue is not None and not session.config.option.collectonly:
        _publish(queue, [item.nodeid for item in session.items])


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """pytest's own loop over ``session.items``, over the tests this process takes from the queue instead; each
    test runs with the next one it takes as ``nextitem`` (what pytest tears fixtures down towards)."""
    queue = _queue(session.config)
    if queue is None or session.config.option.collectonly:
        return None
    if session.testsfailed and not session.config.option.continue_on_collection_errors:
        raise session.Interrupted(f"{session.testsfailed} error(s) during collection")
    items = session.items
    index = _take(queue, 0, len(items))
    while index is not None:
        following = _take(queue, index + 1, len(items))
        (queue / f"{index}{STARTED}").touch()
        items[index].config.hook.pytest_runtest_protocol(
            item=items[index], nextitem=items[following] if following is not None else None
        )
        (queue / f"{index}{DONE}").touch()
        if session.shouldfail or session.shouldstop:
            if session.shouldfail or not getattr(session, PROCESS_ONLY, False):
                (queue / STOP).touch()
            if following is not None:  # taken but not run: give it back (no other process takes more anyway)
                (queue / str(following)).unlink()
            if session.shouldfail:
                raise session.Failed(session.shouldfail)
            raise session.Interrupted(session.shouldstop)
        index = following
    return True
