"""The benchmark tooling that only a GPU run exercises for real, checked here on CPU: the test queue and
parallel runner gpu_check.sh uses for its parity phase, and the replay of CUDA event times into
pytest-benchmark's statistics (a private attribute of pytest-benchmark, so pinned by a test)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import parity_margins, providers, pytest_queue, timing
from benchmarks.shapes import DECODE_MAX_M, linear_cases

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


def _parallel(path: Path, processes: int, *args: str) -> subprocess.CompletedProcess:
    """``parallel_pytest`` with ``processes`` over the tests in ``path``."""
    cmd = [sys.executable, "-m", "benchmarks.parallel_pytest", "-n", str(processes), "--", "-q", *args, str(path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=path, timeout=300)


def _queued(path: Path, queue: Path, *args: str) -> subprocess.CompletedProcess:
    env = {pytest_queue.ENV: str(queue)}
    return _pytest("-q", "-p", "benchmarks.pytest_queue", "-p", "no:randomly", *args, str(path), env=env, cwd=path)


_RECORDING_TESTS = """
import os, time, pytest
LOG = os.path.join(os.path.dirname(__file__), "ran.log")

@pytest.mark.parametrize("i", range({count}))
def test_recorded(i):
    with open(LOG, "a") as f:
        f.write(f"{{i}} {{os.getpid()}}\\n")
    # hold the test until a second process has run one: a queue shared by several processes must let it
    deadline = time.monotonic() + 60
    while len({{line.split()[1] for line in open(LOG)}}) < 2:
        assert time.monotonic() < deadline, "no second process took a test"
        time.sleep(0.05)
    assert i != {fail}, "the planted failure"
"""


def _ran(path: Path) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split())) for line in (path / "ran.log").read_text().splitlines()]


def test_queue_runs_every_test_once_across_processes(tmp_path):
    (tmp_path / "test_q.py").write_text(_RECORDING_TESTS.format(count=9, fail=-1))
    out = _parallel(tmp_path, 3, "-p", "no:cacheprovider")
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(i for i, _ in _ran(tmp_path)) == list(range(9))  # each test once
    assert len({pid for _, pid in _ran(tmp_path)}) >= 2
    assert "9 of 9 collected tests run" in out.stdout


def test_parallel_runner_reports_a_failing_process(tmp_path):
    (tmp_path / "test_q.py").write_text(_RECORDING_TESTS.format(count=6, fail=4))
    out = _parallel(tmp_path, 3, "-p", "no:cacheprovider")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "the planted failure" in out.stdout
    summary = [line for line in out.stdout.splitlines() if line.startswith("process ")]
    assert len(summary) == 3 and sum(line.split()[3] == "1" for line in summary) == 1, summary
    assert "6 of 6 collected tests run" in out.stdout

    (tmp_path / "test_q.py").write_text("def test_ok():\n    pass\n")
    out = _parallel(tmp_path, 3, "-p", "no:cacheprovider")
    assert out.returncode == 0, out.stdout + out.stderr  # two processes have nothing to run: not a failure


def test_a_failure_under_x_stops_the_other_processes(tmp_path):
    """One process after another on the same queue: the first fails its 3rd test under -x and stops; the second
    then takes nothing, and the test the first had taken next is given back (not counted as taken)."""
    tests = "import pytest\n@pytest.mark.parametrize('i', range(6))\ndef test_x(i):\n    assert i != 2\n"
    (tmp_path / "test_x.py").write_text(tests)
    queue = tmp_path / "queue"
    queue.mkdir()
    first = _queued(tmp_path, queue, "-x")
    assert first.returncode == 1 and "1 failed, 2 passed" in first.stdout, first.stdout
    assert pytest_queue.taken(queue) == pytest_queue.finished(queue) == {0, 1, 2}
    assert len(pytest_queue.collected(queue) or []) == 6
    second = _queued(tmp_path, queue, "-x")
    assert second.returncode == 0 and "no tests ran" in second.stdout, second.stdout


def test_a_process_that_dies_leaves_its_tests_named(tmp_path):
    """A process that dies in a test (here with status 0, which would otherwise read as a pass) leaves that test
    unfinished and the one it had taken next not started: the runner names them apart and fails."""
    tests = "import os\ndef test_a(): pass\ndef test_dies(): os._exit(0)\ndef test_c(): pass\ndef test_d(): pass\n"
    (tmp_path / "test_d.py").write_text(tests)
    out = _parallel(tmp_path, 1, "-p", "no:cacheprovider")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 of 4 collected tests run" in out.stdout
    assert "1 started but never finished:\n    test_d.py::test_dies\n" in out.stdout
    assert "1 taken next by those processes, never started:\n    test_d.py::test_c\n" in out.stdout


def test_collect_only_through_the_runner(tmp_path):
    (tmp_path / "test_c.py").write_text("def test_one(): pass\n")
    out = _parallel(tmp_path, 2, "--collect-only")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "test_c.py::test_one" in out.stdout


def test_processes_that_collect_differently_are_refused(tmp_path):
    (tmp_path / "test_c.py").write_text("def test_one(): pass\ndef test_two(): pass\n")
    queue = tmp_path / "queue"
    queue.mkdir()
    assert _queued(tmp_path, queue, "-k", "one").returncode == 0
    other = _queued(tmp_path, queue)
    assert other.returncode != 0
    assert "PYTEST_QUEUE" in other.stdout + other.stderr and "same pytest arguments" in other.stdout + other.stderr


def test_queue_must_name_a_directory(tmp_path):
    (tmp_path / "test_c.py").write_text("def test_one(): pass\n")
    out = _queued(tmp_path, tmp_path / "missing")
    assert out.returncode != 0 and "PYTEST_QUEUE" in out.stdout + out.stderr


def test_compile_simulation_shares_what_is_done():
    from benchmarks.count_specialisations import OTHER_SECONDS, busiest

    a, b, c, d = ((("_k",), ("x", i)) for i in range(4))  # four specialisations of a kernel without a timing
    assert busiest([{a}, {b}, {c}, {d}], 2) == pytest.approx(2 * OTHER_SECONDS)  # two each
    assert busiest([{a}, {a}, {a}], 3) == pytest.approx(OTHER_SECONDS)  # compiled three times at once
    assert busiest([{a, b}, {a}], 1) == pytest.approx(2 * OTHER_SECONDS)  # the second test finds a done
    # the second process starts on {a} at 0 s, before the first has a (0.3 s): both compile it
    assert busiest([{a, b, c}, {a}, {d}], 2) == pytest.approx(3 * OTHER_SECONDS)
    assert busiest([{a}, {b}, {a}, {a}, {a}], 2) == pytest.approx(OTHER_SECONDS)  # from 0.3 s a is in the cache


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts under the CPU interpreter")
def test_specialisations_are_counted_under_the_interpreter():
    import triton

    from tied_lora_kernels import kernels

    if kernels.release(triton.__version__) < (3, 6):
        pytest.skip(f"the counter hooks triton >= 3.6's interpreter, not {triton.__version__}'s")
    cmd = [sys.executable, "-m", "benchmarks.count_specialisations", "-n", "1,2", "--", "-p", "no:cacheprovider"]
    cmd += ["tests/test_kernels_parity.py", "-k", "test_shapes and (M1 or M0)"]  # (3 dtypes)
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    counted = re.search(r"(\d+) tests, (\d+) launches, (\d+) distinct", out.stdout)
    assert counted is not None and counted[1] == "6", out.stdout
    launches, distinct = int(counted[2]), int(counted[3])
    assert 0 < distinct < launches and "_fused_lora_mm_kernel" in out.stdout
    assert "busiest of 1 queue processes" in out.stdout and "busiest of 2 queue processes" in out.stdout


def test_replayed_event_times_become_the_benchmark_statistics(benchmark):
    if benchmark.disabled:
        pytest.skip("--benchmark-disable records no statistics")
    times = [3e-3, 1e-3, 2e-3, 4e-3]
    timing._replay(benchmark, times)
    stats = benchmark.stats.stats
    assert stats.rounds == 4
    assert stats.min == pytest.approx(1e-3) and stats.max == pytest.approx(4e-3)
    assert stats.median == pytest.approx(2.5e-3) and stats.mean == pytest.approx(2.5e-3)


def test_a_round_of_several_projections_is_recorded_per_projection(benchmark, monkeypatch):
    if benchmark.disabled:
        pytest.skip("--benchmark-disable records no statistics")
    monkeypatch.setattr(timing, "_cuda_times", lambda *args: ([8e-6, 4e-6, 6e-6], "cuda-graph", []))
    how, reference = timing.run(benchmark, lambda: None, None, torch.device("cuda"), graph=True, calls=4)
    assert how == "cuda-graph" and benchmark.stats.stats.median == pytest.approx(1.5e-6) and reference is None
    with pytest.raises(ValueError, match="CUDA only"):
        timing.run(benchmark, lambda: None, None, torch.device("cpu"), calls=2)


def test_cuda_rounds_are_paired_with_the_floor_s(benchmark, monkeypatch):
    """On CUDA too, a round of the reference (nn.Linear) is timed right before each eager round (a GPU's clocks
    drift over a run; a ratio of cases timed apart would carry it), each after its own L2 flush, and run() returns
    the reference's statistics. Faked here: CUDA events that read the host's clock."""
    if benchmark.disabled:
        pytest.skip("--benchmark-disable records no statistics")
    import time

    class Event:
        def __init__(self, enable_timing):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3  # (milliseconds, as CUDA's)

    order = []
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(timing, "_flush_buffer", lambda device: torch.zeros(4))
    monkeypatch.setattr(timing, "_evict_l2", lambda flush: order.append("flush"))

    def ours():
        order.append("ours")
        time.sleep(2e-3)

    def floor():
        order.append("floor")
        time.sleep(1e-3)

    cuda = torch.device("cuda")
    times, how, reference = timing._cuda_times(ours, None, cuda, False, 0.05, False, (None, floor))
    assert how == "cuda-events" and len(times) == len(reference) >= 10
    timed = order[order.index("flush") :]
    assert timed[:6] == ["flush", "floor", "flush", "ours", "flush", "floor"]
    assert min(times) > min(reference) > 0.9e-3
    how, floor_s = timing.run(benchmark, ours, None, cuda, paired=(None, floor), target_s=0.05)
    assert how == "cuda-events" and 0.9e-3 < floor_s["min"] < benchmark.stats.stats.min
    # without a reference, none (as for a CUDA graph's rounds, whose reference would need a capture of its own)
    times, how, reference = timing._cuda_times(ours, None, cuda, False, 0.02, False, None)
    assert reference == [] and len(times) >= 10
    # a graph whose capture fails is timed eagerly, still unpaired: its round may run several projections (calls)
    # against the reference's one, which run() would then have divided by calls
    import contextlib

    class Stream:
        def __init__(self, *args):
            pass

        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def failed_capture(graph):
        raise RuntimeError("capture failed")
        yield

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", failed_capture)
    times, how, reference = timing._cuda_times(ours, None, cuda, True, 0.02, False, (None, floor))
    assert how.startswith("cuda-events (graph capture failed: RuntimeError") and reference == []


def test_decode_rotates_through_weights_that_fill_several_l2_caches(monkeypatch):
    class Properties:
        L2_cache_size = 50 * 2**20  # an H100's

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    cuda = torch.device("cuda")
    assert timing.weight_copies(4096 * 4096 * 2, cuda) == 7  # 7 x 32 MiB >= 4 x 50 MiB
    assert timing.weight_copies(4096 * 1024 * 2, cuda) == 25
    assert timing.weight_copies(1024, cuda) == timing.MAX_WEIGHT_COPIES
    assert timing.weight_copies(4096 * 14336 * 2, cuda) == 2
    assert timing.weight_copies(2**31, cuda) == 1
    assert timing.weight_copies(1024, torch.device("cpu")) == 1  # (CPU rounds are one call)

    calls = []
    copies = [providers.Built(lambda x, i=i: calls.append(i) or x + i, trainable=[torch.ones(i + 1)]) for i in range(3)]
    built = providers.rotating(copies)
    assert built.fn(torch.zeros(())) == 2 and calls == [0, 1, 2]  # each in turn, the last one's output
    assert [t.numel() for t in built.trainable] == [1, 2, 3]


def test_benchmarks_run_what_the_targets_read_first():
    """gpu_check.sh's bench-linear phase has a time budget: the targets' rows (nn.Linear, torch, triton at K = N =
    4096, every rank and mode) come first, then the forced-choice providers there, then the rest there, then
    the other shapes."""
    runs = providers.schedule([case for case in linear_cases("cuda") if not case.slow])
    groups = []
    for provider, case, _ in runs:
        if (case.shape.K, case.shape.N) != (4096, 4096):
            groups.append(3)
        elif provider in (providers.FLOOR, "torch", "triton"):
            groups.append(0)
        else:
            groups.append(1 if provider in providers.TRITON_FORCED else 2)
    assert groups == sorted(groups) and groups[0] == 0 and groups[-1] == 3
    first = [(provider, case) for (provider, case, _), group in zip(runs, groups, strict=True) if group == 0]
    assert {case.rank for _, case in first} == {8, 16, 64}  # the ranks
    assert {(case.mode, case.M) for _, case in first} == {
        ("forward", 8192), ("backward", 8192), ("fwd+bwd", 8192), ("forward", 1), ("forward", 16),
    }  # fmt: skip
    ids = [test_id for _, _, test_id in runs]
    assert len(ids) == len(set(ids))
    # every case gets every provider its mode and M allow (nn.Linear once per shape, M, dtype and mode)
    by_case = {}
    for provider, case, _ in runs:
        by_case.setdefault(case.id, set()).add(provider)
    for case in {case.id: case for _, case, _ in runs}.values():
        allowed = set(providers.PROVIDERS) - {providers.FLOOR}
        allowed -= set(providers.DECODE_ONLY if case.M > DECODE_MAX_M else providers.PREFILL_ONLY)
        allowed -= set(providers.TRAINING_ONLY) if case.mode == "forward" else set()
        assert by_case[case.id] - {providers.FLOOR} == allowed, case.id
    floors = [(case.shape, case.M, case.mode) for provider, case, _ in runs if provider == providers.FLOOR]
    assert len(floors) == len(set(floors))  # once per shape, M and mode, whatever the ranks
    assert set(floors) == {(case.shape, case.M, case.mode) for _, case, _ in runs}


def test_parity_margins_records_each_comparison_and_keeps_the_check(tmp_path):
    """``benchmarks.parity_margins`` (gpu_check's parity phase) writes each comparison's error / bound and still
    fails a test whose comparison is out of bounds; its summary lists the closest first."""
    (tmp_path / "test_cmp.py").write_text(
        "import torch\n"
        "from tests.helpers import assert_close_to_reference\n"
        "ref = torch.ones(3, dtype=torch.float64)\n"
        "def test_inside():\n"
        "    assert_close_to_reference(torch.ones(3) + 1e-6, ref, torch.ones(3), 'y')\n"
        "def test_outside():\n"
        "    assert_close_to_reference(torch.ones(3) + 1e-3, ref, torch.ones(3), 'dx')\n"
    )
    log = tmp_path / "margins.jsonl"
    proc = _pytest(
        "-p", "benchmarks.parity_margins", "-q", str(tmp_path), env={"PARITY_MARGINS": str(log)}, cwd=tmp_path
    )
    assert proc.returncode == 1 and "1 failed, 1 passed" in proc.stdout, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["test"].split("::")[1], r["name"], r["dtype"]) for r in rows] == [
        ("test_inside", "y", "float32"),
        ("test_outside", "dx", "float32"),
    ]
    assert rows[0]["bound"] == pytest.approx(2e-6) and rows[0]["ratio"] == pytest.approx(0.5, rel=0.1)
    assert rows[1]["ratio"] == pytest.approx(500, rel=0.1)
    lines = parity_margins.summary(rows).splitlines()
    assert lines[0].startswith("parity margins: 2 comparisons") and "float32" in lines[1], lines
    assert "test_outside" in lines[2] and "test_inside" in lines[3], lines  # the closest to its bound first
    # a line a killed process left half-written is skipped, and said so, rather than ending the summary
    log.write_text(log.read_text() + '{"test": "cut')
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.parity_margins", str(log)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0 and "2 comparisons" in done.stdout and "(1 unreadable line skipped)" in done.stdout


def test_gpu_clocks_reads_nvidia_smi_and_never_fails(monkeypatch):
    """``timing.gpu_clocks`` (each CUDA case at the targets' shape records the SM clock after its timed rounds):
    nvidia-smi's CSV parsed; empty on CPU, and where nvidia-smi is missing, hangs or prints something else."""
    calls = []

    def fake(out=None, error=None):
        def run(cmd, **kwargs):
            calls.append(cmd)
            if error:
                raise error
            return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

        return run

    cuda = torch.device("cuda", 1)
    assert timing.gpu_clocks(torch.device("cpu")) == {}
    monkeypatch.setattr(subprocess, "run", fake("1755, 0x0000000000000004\n"))
    assert timing.gpu_clocks(cuda) == {"sm_clock_mhz": 1755, "throttle_reasons": "0x0000000000000004"}
    assert calls[-1][:2] == ["nvidia-smi", "--id=1"]
    for broken in (fake(error=FileNotFoundError()), fake(error=subprocess.TimeoutExpired("nvidia-smi", 2)),
                   fake("[N/A], [N/A]\n"), fake("")):  # fmt: skip
        monkeypatch.setattr(subprocess, "run", broken)
        assert timing.gpu_clocks(cuda) == {}


def test_a_benchmark_that_breaks_the_cuda_context_stops_its_process_only(tmp_path):
    """benchmarks/conftest.py: a failure after which the CUDA context is broken (an illegal memory access is sticky:
    every later case would fail, the baselines too) stops the session once the failure is reported, and
    ``BENCH_BROKEN_LOG`` gets its id (gpu_check.sh's timed runs leave it out). Faked here: a CUDA device whose
    synchronize raises. A plain failure does neither."""
    (tmp_path / "test_x.py").write_text(
        "import torch\n"
        "import benchmarks.conftest as c\n"
        "def test_plain():\n"
        "    assert False\n"
        "def test_broken(monkeypatch):\n"
        "    def synchronize(device=None):\n"
        "        raise RuntimeError('CUDA error: an illegal memory access was encountered\\nmore')\n"
        "    monkeypatch.setattr(c, 'DEVICE', torch.device('cuda'))\n"
        "    monkeypatch.setattr(torch.cuda, 'synchronize', synchronize)\n"
        "    assert False\n"
        "def test_after():\n"
        "    pass\n"
    )
    log = tmp_path / "broken.txt"
    proc = _pytest("-q", "-p", "benchmarks.conftest", str(tmp_path), env={"BENCH_BROKEN_LOG": str(log)}, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "2 failed in" in out and "passed" not in out, out
    assert "the CUDA context is broken after test_x.py::test_broken (CUDA error: an illegal memory access" in out
    assert "FAILED test_x.py::test_broken" in out  # (its failure reported before the session stops)
    assert log.read_text().splitlines() == ["test_x.py::test_broken"]
    # in a queue, that process stops alone: it gives back the test it took, which the next process runs
    queue = tmp_path / "queue"
    queue.mkdir()
    first = _queued(tmp_path, queue, "-p", "benchmarks.conftest")
    assert first.returncode == 2 and "2 failed" in first.stdout, first.stdout + first.stderr
    assert not (queue / pytest_queue.STOP).exists()
    second = _queued(tmp_path, queue, "-p", "benchmarks.conftest")
    assert second.returncode == 0 and "1 passed" in second.stdout, second.stdout + second.stderr
    assert pytest_queue.unfinished(queue) == []


@pytest.mark.parametrize("M", [2, 40])  # decode, prefill
def test_the_fused_providers_compute_what_the_torch_provider_computes(M):
    """The benchmark's ratios compare like with like: every fused-kernel provider (the tables' choice and each forced
    one) gives the torch provider's output and adapter gradients for the same seed (their tensors are drawn alike),
    on the kernels' device (CPU under the interpreter; gpu_check's parity phase runs it on the GPU). The bound, 1 % of
    the largest value, is about the function, not rounding: TF32 left on by another test must not fail it."""
    from benchmarks.shapes import Shape
    from tests.conftest import DEVICE
    from tied_lora_kernels import kernels

    if DEVICE.type == "cpu" and not kernels.interpreting():
        pytest.skip("the fused kernels need a GPU or triton's interpreter")
    shape = Shape("bench-parity", 64, 48)
    x = torch.randn(M, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    dy = torch.randn(M, 48, generator=torch.Generator().manual_seed(4)).to(DEVICE)

    def run(provider):
        built = providers.build(provider, shape, 8, torch.float32, DEVICE)
        y = built.fn(x)
        y.backward(dy)
        return [y.detach(), *(t.grad for t in built.trainable)]

    expected = run("torch")
    for provider in providers.TRITON_FORCED:
        for got, want in zip(run(provider), expected, strict=True):
            scale = want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * scale, msg=lambda m, p=provider: f"{p}: {m}")


def test_kernel_launches_record_the_strategy_split_and_sum_that_ran():
    """The record the report checks its comparisons against (``bench._ran``): each launch of one call, in order,
    with the switches that say which strategy (``LOAD_T``), split (``SPLIT_K``, the grid's second axis) and split-K
    sum (``REDUCE``) ran; a setup's launches and those after the call are not recorded."""
    from triton.runtime.jit import JITFunction

    from tests.conftest import DEVICE
    from tied_lora_kernels import kernels, tied_lora_linear
    from tied_lora_kernels.kernels import forcing

    if DEVICE.type == "cpu" and not kernels.interpreting():
        pytest.skip("the fused kernels need a GPU or triton's interpreter")
    g = torch.Generator().manual_seed(0)  # bf16 (decode splits K in 16-bit only); K = 300 has steps for 3 slices
    x, w = (torch.randn(*size, generator=g).to(DEVICE, torch.bfloat16) for size in ((40, 300), (48, 300)))
    A, B = torch.randn(8, 300, generator=g).to(DEVICE), torch.randn(48, 8, generator=g).to(DEVICE)
    u, v = torch.randn(8, generator=g).to(DEVICE), torch.randn(48, generator=g).to(DEVICE)

    def call(M=40):
        with torch.no_grad():
            return tied_lora_linear(x[:M], w, None, A, B, u, v, backend="triton")

    def launches(M, setup=None, **forced):
        with forcing.forced(**forced):
            return timing.kernel_launches(lambda: call(M), setup)

    run = vars(JITFunction)["run"]
    one, two = launches(40, strategy="one_pass"), launches(40, setup=call, strategy="two_pass")
    assert [launch["kernel"] for launch in one] == ["_prepare_kernel", "_fused_lora_mm_kernel"]
    assert [launch["kernel"] for launch in two] == ["_prepare_kernel", "_shrink_kernel", "_fused_lora_mm_kernel"]
    assert not one[-1]["LOAD_T"] and two[-1]["LOAD_T"] and not one[-1]["SPLIT_K"]
    split = launches(2, split_k=3, reduce="kernel")  # decode: the GEMM alone, its slices summed in its launch
    assert [launch["kernel"] for launch in split] == ["_fused_lora_mm_kernel"]
    assert split[0]["SPLIT_K"] and split[0]["REDUCE"] and split[0]["grid"][1] == 3
    assert vars(JITFunction)["run"] is run  # (put back)
    plan = timing.plan_of(split)
    assert plan.startswith("fused_lora_mm[M16 ") and plan.endswith(" SPLIT_K REDUCE grid 1x3]"), plan
    assert timing.plan_of(two).startswith("prepare[w4 grid 3] · shrink[M")  # (A: 2,400 elements, 3 blocks)


def test_the_ptxas_probe_runs_the_tests_under_the_ptxas_it_names(tmp_path, monkeypatch):
    """gpu_check's ptxas probe (``benchmarks/ptxas_probe.py``): its children assemble Hopper kernels with the ptxas it
    names, the guard (``kernels.hopper_ptxas``) off, and it reports the tests that were not exact. Here on the CPU
    interpreter, with a ptxas 12.9-13.2 that triton bundles (triton 3.9's own ``ptxas``), and a test that fails."""
    from benchmarks import ptxas_probe
    from tied_lora_kernels import kernels

    if not kernels.interpreting():
        pytest.skip("on a GPU, gpu_check.sh runs the probe itself")
    monkeypatch.delenv("TRITON_PTXAS_PATH", raising=False)
    monkeypatch.delenv("TRITON_PTXAS_BLACKWELL_PATH", raising=False)
    tool = ptxas_probe._affected_ptxas()
    if tool is None:
        pytest.skip("this triton bundles no ptxas 12.9-13.2")
    failing = tmp_path / "test_not_exact.py"
    failing.write_text("def test_not_exact():\n    assert False\n")
    exact = "tests/test_kernels_parity.py::test_small_integers_are_exact[torch.bfloat16-aligned]"
    monkeypatch.chdir(ROOT)
    result = ptxas_probe.probe(tool, [exact, str(failing)])
    assert result["assembled_by"] == [tool.version], result
    assert len(result["failed"]) == 1 and result["failed"][0].endswith("::test_not_exact"), result
    assert result["result"] == "CORRUPT: 1 tests not exact", result
    assert "test_not_exact" in result["stdout_tail"]  # (the children's output is kept in the JSON, not printed)


def test_each_forced_provider_runs_what_the_choice_table_compares():
    """``bench_tables.choice_rows`` keeps a pair only where the recorded launches (``timing.kernel_launches``) show
    that each side ran what its column compares (``_ran``): a provider forcing the wrong choice or nothing (the torch
    backend, or a ``forcing.forced`` block left before the call), or a switch the record does not keep, would leave
    every pair of a column out of the GPU run's table. Each provider here as ``test_bench_linear`` builds it, bf16."""
    from benchmarks.shapes import Shape
    from tests.conftest import DEVICE
    from tied_lora_kernels import kernels
    from tied_lora_kernels.bench_tables import _CHOICE_PAIRS, _ran
    from tied_lora_kernels.kernels import configs, forcing

    if DEVICE.type == "cpu" and not kernels.interpreting():
        pytest.skip("the fused kernels need a GPU or triton's interpreter")
    shape = Shape("bench-launches", 320, 48)  # K = 320: rows of 16 bytes (TMA), K steps for 3 slices (split-K)
    x = torch.randn(40, 320, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.bfloat16)

    def record(provider, M):
        built = providers.build(provider, shape, 8, torch.bfloat16, DEVICE)

        def forward():
            with torch.no_grad():
                built.fn(x[:M])

        with forcing.forced(split_k=3):  # (decode: three K slices; prefill never splits)
            return {"launches": timing.kernel_launches(forward)}

    prefill = {p: record(p, 40) for p in ("triton", "triton-1pass", "triton-2pass", "triton-ptr")}
    decode = {p: record(p, 2) for p in ("triton", "triton-1launch", "triton-intile")}
    for num, den, switch in _CHOICE_PAIRS:
        if switch == "TMA" and not configs.tma_for(40, torch.bfloat16, DEVICE, 1):
            continue  # (a GPU without TMA loads: the default's prefill runs pointer loads too)
        runs = prefill if num in prefill and den in prefill else decode
        assert (_ran(runs[num], switch), _ran(runs[den], switch)) == (True, False), (num, den, switch)


def test_the_dropout_providers_train_with_dropout():
    """``triton-dropout`` and ``peft-lora-dropout`` (the headline's last column) run adapter dropout ``DROPOUT``:
    the kernels draw their mask in the forward's shrink, PEFT runs ``nn.Dropout``."""
    from benchmarks.shapes import Shape
    from tests.conftest import DEVICE
    from tied_lora_kernels import kernels

    shape = Shape("bench-dropout", 64, 48)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    if DEVICE.type != "cpu" or kernels.interpreting():
        built = providers.build("triton-dropout", shape, 8, torch.float32, DEVICE)
        launches = timing.kernel_launches(lambda: built.fn(x))
        assert any(launch.get("DROPOUT") for launch in launches), launches
    pytest.importorskip("peft")
    layer = providers.build("peft-lora-dropout", shape, 8, torch.float32, DEVICE).fn
    assert layer.lora_dropout["default"].p == providers.DROPOUT


def test_flops_and_bytes_of_one_call():
    """The per-shape tables' TFLOP/s and GB/s: the base GEMM and the rank-R path (backward: dx and the adapter's
    four rank-R products), fp32 master A and B read once per pass."""
    from benchmarks.shapes import flops, min_bytes

    M, K, N, R = 8, 32, 16, 4
    assert flops(M, K, N, R, "forward") == 2 * M * N * K + 2 * M * R * (K + N) == 11264
    assert flops(M, K, N, R, "backward") == 2 * M * N * K + 4 * M * R * (K + N) == 14336
    assert flops(M, K, N, R, "fwd+bwd") == 11264 + 14336
    assert flops(M, K, N, R, "forward", adapter=False) == 2 * M * N * K
    fwd = (M * K + N * K + M * N) * 2 + R * (K + N) * 4
    bwd = (M * N + N * K + M * K) * 2 + M * K * 2 + R * (K + N) * 4
    assert min_bytes(M, K, N, R, "forward", 2) == fwd and min_bytes(M, K, N, R, "backward", 2) == bwd
    assert min_bytes(M, K, N, R, "fwd+bwd", 2) == fwd + bwd
    assert min_bytes(M, K, N, R, "forward", 2, adapter=False) == (M * K + N * K + M * N) * 2


def test_parity_margins_summary_gives_each_dtype_s_largest_ratio():
    """The summary gpu_check prints (and the results README compares with the CPU baseline): per dtype the largest
    error / bound, then the comparisons closest to their bounds, by that ratio (not by the error alone)."""
    rows = [dict(test=f"t{i}", name="y", dtype="bfloat16", err=err, ratio=ratio)
            for i, (err, ratio) in enumerate(((1e-3, 0.31), (5e-2, 0.05), (1e-3, 0.12)))]  # fmt: skip
    rows.append(dict(test="t3", name="dx", dtype="float32", err=1e-7, ratio=0.2))
    lines = parity_margins.summary(rows, worst=2).splitlines()
    assert lines[1].split() == ["bfloat16", "3", "comparisons,", "largest", "0.31"]
    assert lines[2].split() == ["float32", "1", "comparisons,", "largest", "0.20"]
    assert [line.split()[-1] for line in lines[3:]] == ["t0", "t3"]


def test_parity_margins_records_the_dtype_the_comparison_is_for(tmp_path):
    """A comparison made for another dtype than the tensor's (an fp32 adapter gradient of a bf16 run, ``dtype=``)
    is recorded under that dtype, against the bound the check applies (its dtype's atol)."""
    from tests.helpers import ATOL

    (tmp_path / "test_cmp.py").write_text(
        "import torch\n"
        "from tests.helpers import assert_close_to_reference\n"
        "def test_bf16_run():\n"
        "    ref = torch.ones(3, dtype=torch.float64)\n"
        "    assert_close_to_reference(torch.ones(3) + 1e-3, ref, torch.ones(3), 'dA', torch.bfloat16)\n"
    )
    log = tmp_path / "margins.jsonl"
    proc = _pytest(
        "-p", "benchmarks.parity_margins", "-q", str(tmp_path), env={"PARITY_MARGINS": str(log)}, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert row["dtype"] == "bfloat16" and row["bound"] == pytest.approx(ATOL[torch.bfloat16])
    assert row["ratio"] == pytest.approx(1e-3 / ATOL[torch.bfloat16], rel=0.01)


def test_the_linear_benchmark_pairs_cuda_prefill_rounds_with_the_floor(monkeypatch):
    """``benchmarks/test_bench_linear.py`` on CUDA (faked: tensors on the CPU, ``timing.run`` recorded): a prefill
    case's rounds are paired with nn.Linear's of the same mode, whose statistics the record keeps as
    ``paired_floor`` (the report's ratios prefer it); a decode forward (M <= 16) is a CUDA graph, unpaired; the floor
    itself is unpaired, at rank 0."""
    import signal
    import types

    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    try:  # (benchmarks/conftest.py sets one CPU thread and a SIGTERM handler when imported)
        from benchmarks import test_bench_linear as bench_linear
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGTERM, handler)
    cpu, stats = torch.device("cpu"), {"median": 2.0, "min": 1.0, "mean": 3.0}

    class Torch:  # torch, with every tensor made on the CPU
        def __getattr__(self, name):
            return getattr(torch, name)

        Generator = staticmethod(lambda device=None: torch.Generator())
        randn = staticmethod(lambda *size, device=None, **kwargs: torch.randn(*size, **kwargs))

    runs = []

    def run(benchmark, fn, setup, device, graph=False, paired=None, target_s=None, idle_start=False, calls=1):
        runs.append(dict(graph=graph, paired=paired, setup=setup))
        return ("cuda-graph", None) if graph else ("cuda-events", stats if paired else None)

    build = providers.build
    monkeypatch.setattr(bench_linear, "DEVICE", types.SimpleNamespace(type="cuda"))
    monkeypatch.setattr(bench_linear, "torch", Torch())
    monkeypatch.setattr(
        providers, "build", lambda provider, shape, rank, dtype, device: build(provider, shape, rank, dtype, cpu)
    )
    monkeypatch.setattr(providers, "unavailable", lambda provider, device: None)
    monkeypatch.setattr(timing, "run", run)
    monkeypatch.setattr(timing, "weight_copies", lambda weight_bytes, device: 1)
    monkeypatch.setattr(timing, "cuda_peak_bytes", lambda fn, setup, device: None)
    monkeypatch.setattr(timing, "gpu_clocks", lambda device: {})
    monkeypatch.setattr(timing, "device_info", lambda device_type: {"device": device_type})
    case = next(c for c in bench_linear.CASES.values() if c.M > DECODE_MAX_M and c.mode == "fwd+bwd")
    decode = next(c for c in bench_linear.CASES.values() if c.M == DECODE_MAX_M and c.mode == "forward")
    records = []
    for provider, c in (("torch", case), ("torch", decode), (providers.FLOOR, case)):
        benchmark = types.SimpleNamespace(disabled=False, extra_info={}, group=None)
        bench_linear.test_linear(benchmark, provider, c.id)
        records.append(benchmark.extra_info)
    prefill, graph, floor = runs
    assert not prefill["graph"] and prefill["setup"] is not None  # fwd+bwd: the gradients cleared before each round
    assert prefill["paired"] is not None and prefill["paired"][0] is not None  # the floor's fwd+bwd, not its forward
    assert records[0]["paired_floor"] == stats and records[0]["rank"] == case.rank
    assert graph["graph"] and graph["paired"] is None and records[1]["paired_floor"] is None
    assert floor["paired"] is None and records[2]["rank"] == 0 and records[2]["paired_floor"] is None


def test_a_time_budget_skips_what_is_left(tmp_path):
    """benchmarks/conftest.py: once a session has run ``BENCH_TIME_BUDGET_S``, the remaining tests are skipped (so a
    gpu_check phase still writes its JSON); before that they run."""
    (tmp_path / "test_b.py").write_text("def test_one():\n    pass\n")
    for budget, outcome in (("0", "1 skipped"), ("3600", "1 passed")):
        env = {"BENCH_TIME_BUDGET_S": budget}
        proc = _pytest("-q", "-p", "benchmarks.conftest", str(tmp_path), env=env, cwd=tmp_path)
        assert outcome in proc.stdout, proc.stdout + proc.stderr


def test_the_default_tier_collects_the_default_cases_only():
    """Without ``-m slow`` the benchmarks' slow tier is left out (gpu_check times the default tier), and no default
    case with it."""
    proc = _pytest("--collect-only", "-q", "benchmarks/test_bench_linear.py")
    ids = {line.split("[", 1)[1].rstrip("]") for line in proc.stdout.splitlines() if "::test_linear[" in line}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default = {test_id for _, case, test_id in providers.schedule(linear_cases(device)) if not case.slow}
    assert ids == default, proc.stdout[-2000:]
