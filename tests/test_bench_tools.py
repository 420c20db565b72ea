"""The benchmark tooling that only a GPU run exercises for real, checked here on CPU: the slicing plugin and
parallel runner gpu_check.sh uses for its parity phase, and the replay of CUDA event times into
pytest-benchmark's statistics (a private attribute of pytest-benchmark, so pinned by a test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import pytest_shard, timing

ROOT = Path(__file__).resolve().parents[1]


def _pytest(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def _collected(path: Path, shard: str | None = None) -> list[str]:
    env = {pytest_shard.ENV: shard or ""}
    out = _pytest("--collect-only", "-q", "-p", "benchmarks.pytest_shard", str(path), env=env, cwd=path)
    assert out.returncode == 0, out.stdout + out.stderr
    return [line for line in out.stdout.splitlines() if "::" in line]


def test_shards_partition_the_collection_into_contiguous_slices(tmp_path):
    (tmp_path / "test_a.py").write_text("import pytest\n@pytest.mark.parametrize('i', range(7))\ndef test_a(i): pass\n")
    (tmp_path / "test_b.py").write_text("def test_b(): pass\n")
    everything = _collected(tmp_path)
    assert len(everything) == 8
    slices = [_collected(tmp_path, shard=f"{i}/3") for i in range(3)]
    assert [t for s in slices for t in s] == everything  # in order, each test exactly once
    assert sorted(map(len, slices)) == [2, 3, 3]


@pytest.mark.parametrize("spec", ["3", "a/b", "3/3", "-1/2", "1/0"])
def test_bad_shard_spec_is_named(spec):
    with pytest.raises(ValueError, match="PYTEST_SHARD"):
        pytest_shard.parse(spec)


def test_parallel_runner_reports_a_failing_slice(tmp_path):
    (tmp_path / "test_some.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('i', range(6))\n"
        "def test_value(i):\n"
        "    assert i != 4, 'the planted failure'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "benchmarks.parallel_pytest", "-n", "3", "--", "-q", "-p", "no:cacheprovider"]
    out = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "the planted failure" in out.stdout
    summary = [line for line in out.stdout.splitlines() if line.startswith("slice ")]
    assert [line.split()[3] for line in summary] == ["0", "0", "1"], summary  # i = 4 is in the last slice
    assert "1 failed, 1 passed" in summary[2]

    (tmp_path / "test_some.py").write_text("def test_ok():\n    pass\n")
    out = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr  # two slices have nothing to run: not a failure


def test_replayed_event_times_become_the_benchmark_statistics(benchmark):
    if benchmark.disabled:
        pytest.skip("--benchmark-disable records no statistics")
    times = [3e-3, 1e-3, 2e-3, 4e-3]
    timing._replay(benchmark, times)
    stats = benchmark.stats.stats
    assert stats.rounds == 4
    assert stats.min == pytest.approx(1e-3) and stats.max == pytest.approx(4e-3)
    assert stats.median == pytest.approx(2.5e-3) and stats.mean == pytest.approx(2.5e-3)
