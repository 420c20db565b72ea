"""How every benchmark is timed and how its memory is counted, the same way for every provider.

- CPU: pytest-benchmark's own timer (``benchmark.pedantic``), an untimed ``setup`` before each round.
- CUDA: each round is bracketed by CUDA events on the stream, after the L2 cache is flushed (a 256 MiB
  read: a write would leave L2 full of dirty lines whose write-back the timed kernel would pay while it reads
  its weight), so the weights come from HBM as they would in a model; decode rounds replay a CUDA graph (no
  launch overhead; eager events when capture fails) of ``calls`` projections, each with a weight of its own
  (``weight_copies``: together several times the L2, as a model's layers are), and a round's time is divided by
  ``calls``: one projection at decode lasts a few microseconds, near the events' resolution (~0.5 µs). The
  event times are then handed to pytest-benchmark through a replay clock, so the JSON's ``stats`` are GPU
  times and read the same as CPU results.
- Pairing (``run``'s ``paired``): a round of the reference (nn.Linear of the same case) right before each round,
  on CPU (a busy shared machine) and for CUDA's eager rounds (clocks that drift over a run); its statistics go
  into the record as ``paired_floor``, which the report's ratios prefer.
- Memory: bytes saved for backward (saved-tensor hooks, unique storages, parameters and buffers excluded),
  on any device; on CUDA also the peak allocated above what was live before the call.
- What ran: the triton kernels one untimed call launches, with their grids, tiles and switches
  (``kernel_launches``), so that a time can be read against the strategy, loads and split it measured.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = [
    "run", "weight_copies", "saved_bytes", "cuda_peak_bytes", "kernel_launches", "launches_through", "kernel_name",
    "plan_of", "device_info", "gpu_clocks",
]  # fmt: skip

CPU_TARGET_S = 0.25  # time spent measuring one CPU case
CUDA_TARGET_S = 0.10  # time spent measuring one CUDA case
L2_FLUSH_BYTES = 256 * 2**20
ROTATION_L2S = 4  # decode: the rotated weights hold together at least this many L2 caches
MAX_WEIGHT_COPIES = 32


def run(
    benchmark,
    fn: Callable[[], object],
    setup: Callable[[], object] | None,
    device: torch.device,
    graph: bool = False,
    paired: tuple[Callable[[], object] | None, Callable[[], object]] | None = None,
    target_s: float | None = None,
    idle_start: bool = False,
    calls: int = 1,
) -> tuple[str, dict | None]:
    """Time ``fn`` (``setup`` runs untimed before each round) and record it in ``benchmark``.

    ``paired = (setup, fn)`` of a reference (the floor): one reference round is timed right before every round of
    ``fn``, so both see the same machine load (CPU) or the same clocks (CUDA, whose clocks drift over a run) and
    their ratio holds; on CUDA for eager rounds only (a CUDA graph's reference would need its own capture and
    weights: decode's floor stays its own benchmark). Returns how it was timed (``"wall"``, ``"cuda-events"``,
    ``"cuda-graph"``, ``"disabled"``; a failed graph capture gives ``"cuda-events (graph capture failed:
    <error>)"``) and the reference's ``{"median", "min", "mean"}`` seconds (None when not paired). ``target_s``:
    time to spend measuring (default CPU_TARGET_S / CUDA_TARGET_S). ``idle_start`` (CUDA): each round starts on an
    idle GPU, after the L2 flush has finished, so that host time the GPU waits for shows in the round's time (eager
    decode); otherwise the host queues the round while the flush runs, as a busy model would. ``calls`` (CUDA): how
    many projections one ``fn()`` runs; each round's time is divided by it.
    """
    if calls != 1 and device.type != "cuda":
        raise ValueError("calls > 1 (a round of several projections) is timed on CUDA only")
    if benchmark.disabled:  # --benchmark-disable: pedantic makes one untimed call, a smoke test
        benchmark.pedantic(fn, setup=setup, rounds=1)
        return "disabled", None
    if device.type == "cuda":
        times, how, reference = _cuda_times(fn, setup, device, graph, target_s or CUDA_TARGET_S, idle_start, paired)
        _replay(benchmark, [t / calls for t in times])
        return how, _stats([t / calls for t in reference]) if reference else None
    # warm-up (and compile) outside the timer, then size the run from one timed call
    for _ in range(2):
        _call(setup, fn)
    t = _time_once(setup, fn)
    rounds = int(min(max((target_s or CPU_TARGET_S) / max(t, 1e-6), 5), 50))
    reference: list[float] = []
    if paired:
        ref_setup, ref_fn = paired
        _call(ref_setup, ref_fn)

        def paired_setup():
            reference.append(_time_once(ref_setup, ref_fn))
            if setup:
                setup()

    benchmark.pedantic(fn, setup=paired_setup if paired else setup, rounds=rounds, warmup_rounds=1)
    if not reference:
        return "wall", None
    return "wall", _stats(reference[1:])  # (the warm-up round's left out)


def _stats(seconds: list[float]) -> dict:
    return {"median": statistics.median(seconds), "min": min(seconds), "mean": statistics.mean(seconds)}


def _call(setup, fn):
    if setup:
        setup()
    fn()


def _time_once(setup, fn) -> float:
    if setup:
        setup()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class _ReplayClock:
    """A clock that only moves when ``tick`` is called: pytest-benchmark reads it before and after a round."""

    def __init__(self, times: Iterable[float]):
        self.now = 0.0
        self._times = iter(times)

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += next(self._times)

    def __repr__(self) -> str:  # what the JSON's options.timer says
        return "cuda-events (replayed)"


def _replay(benchmark, times: list[float]) -> None:
    clock = _ReplayClock(times)
    # pytest-benchmark has no public hook for externally measured rounds; its runner reads `_timer`.
    benchmark._timer = clock
    benchmark.pedantic(clock.tick, rounds=len(times), iterations=1, warmup_rounds=0)


def weight_copies(weight_bytes: int, device: torch.device) -> int:
    """How many copies of a ``weight_bytes`` weight a decode round rotates through on ``device``: enough to fill
    ``ROTATION_L2S`` L2 caches (so each projection reads its weight from HBM, as in a model), at most
    ``MAX_WEIGHT_COPIES``; 1 off CUDA."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
    return max(1, min(MAX_WEIGHT_COPIES, math.ceil(ROTATION_L2S * l2 / max(weight_bytes, 1))))


@functools.cache
def _flush_buffer(device: torch.device) -> Tensor:
    return torch.zeros(L2_FLUSH_BYTES // 4, dtype=torch.float32, device=device)


def _evict_l2(flush: Tensor) -> None:
    """Read the flush buffer (several L2s): it leaves clean lines behind, which the next round's loads evict for
    free."""
    flush.sum()


def _cuda_times(
    fn, setup, device, graph: bool, target_s: float, idle_start: bool, paired=None
) -> tuple[list[float], str, list[float]]:
    """Each round's seconds, how they were timed, and the reference's rounds (``paired``: one before each round,
    eager rounds only; else empty)."""
    flush = _flush_buffer(device)
    # (a graph's reference would need a capture of its own: decode's floor stays its own benchmark, also when the
    # capture fails, whose eager round may run several projections against the reference's one)
    reference = None if graph else paired
    for _ in range(3):  # warm-up: compile, autotune, cuBLAS heuristics
        _call(setup, fn)
        if reference:
            _call(*reference)
    torch.cuda.synchronize(device)
    how, target = "cuda-events", fn
    if graph and setup is None:
        stream = torch.cuda.current_stream(device)
        try:
            g = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream(device).wait_stream(side)
            with torch.cuda.graph(g):
                fn()
            target, how = g.replay, "cuda-graph"
        except Exception as e:  # a provider that cannot be captured is timed eagerly, and says why
            # (a capture that fails in torch.cuda.graph's exit leaves its capture stream current: put ours back)
            torch.cuda.set_stream(stream)
            torch.cuda.synchronize(device)
            target, how = fn, f"cuda-events (graph capture failed: {type(e).__name__}: {e})"[:300]
    steps = [reference, (setup, target)] if reference else [(setup, target)]

    def rounds(n: int) -> list[list[float]]:
        events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in steps]
                  for _ in range(n)]  # fmt: skip
        for pairs in events:
            for (step_setup, step), (s, e) in zip(steps, pairs, strict=True):
                if step_setup:
                    step_setup()
                _evict_l2(flush)
                if idle_start:
                    torch.cuda.synchronize(device)
                s.record()
                step()
                e.record()
        torch.cuda.synchronize(device)
        return [[s.elapsed_time(e) / 1e3 for s, e in pairs] for pairs in events]

    estimate = min(sum(r) for r in rounds(5))
    n = int(min(max(target_s / max(estimate, 1e-7), 10), 200))
    timed = rounds(n)
    return [r[-1] for r in timed], how, [r[0] for r in timed] if len(steps) == 2 else []


def saved_bytes(forward: Callable[[], object], exclude: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages ``forward`` saves for backward, not counting ``exclude`` (weights)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in excluded:
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


def cuda_peak_bytes(fn: Callable[[], object], setup: Callable[[], object] | None, device) -> int | None:
    """Peak bytes allocated by one ``fn()`` call above what was live before it (CUDA only)."""
    if device.type != "cuda":
        return None
    if setup:
        setup()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


LAUNCH_KEYS = (
    "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_C", "num_warps", "num_stages",
    "TMA", "SPLIT_K", "REDUCE", "RANK_APART", "LOAD_T", "WRITE_T", "USE_ATOMIC", "DROPOUT", "PRECISION",
)  # fmt: skip
"""The keyword arguments of a launch that ``kernel_launches`` keeps: tiles, warps and stages, and the switches
that say which strategy (``LOAD_T``: two-pass), loads (``TMA``) and split-K sum (``SPLIT_K``, ``REDUCE``,
``RANK_APART``) it ran."""


def kernel_launches(fn: Callable[[], object], setup: Callable[[], object] | None = None) -> list[dict]:
    """The triton kernels one ``fn()`` call launches (after ``setup()``, not recorded), in order: each as
    ``{"kernel": name, "grid": [...], key: value}`` for the ``LAUNCH_KEYS`` it passed. Compiled kernels and the
    interpreter's alike; the call runs as it would (a first call compiles)."""
    launches: list[dict] = []

    def record(kernel, grid, kwargs, launch: Callable[[], object]) -> object:
        shown = list(grid) if isinstance(grid, tuple | list) else "callable"
        launches.append(
            {"kernel": kernel_name(kernel), "grid": shown, **{k: kwargs[k] for k in LAUNCH_KEYS if k in kwargs}}
        )
        return launch()

    if setup:
        setup()
    with launches_through(record):
        fn()
    return launches


def kernel_name(kernel) -> str:
    """The name of a ``@triton.jit`` function's kernel (its Python function's)."""
    return getattr(getattr(kernel, "fn", kernel), "__name__", "?")


@contextlib.contextmanager
def launches_through(around: Callable[[object, object, dict, Callable[[], object]], object]):
    """In the block, each triton launch runs as ``around(kernel, grid, kwargs, launch)``, where ``launch()``
    launches it and returns what it returns: compiled kernels and the interpreter's alike (a warm-up compile,
    which launches nothing, is left alone). Not thread-safe: it patches triton's classes."""
    from triton.runtime.jit import JITFunction

    classes: list[type] = [JITFunction]
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)

    def through_run(original):
        def run(self, *args, **kwargs):
            if kwargs.get("warmup"):
                return original(self, *args, **kwargs)
            return around(self, kwargs.get("grid"), kwargs, functools.partial(original, self, *args, **kwargs))

        return run

    def through_getitem(original):  # (triton < 3.6's interpreter launches from __getitem__, without run)
        def getitem(self, grid):
            launch = original(self, grid)
            return lambda *args, **kwargs: around(self, grid, kwargs, functools.partial(launch, *args, **kwargs))

        return getitem

    patched = []
    for cls in classes:
        name, wrap = ("run", through_run) if "run" in vars(cls) else ("__getitem__", through_getitem)
        patched.append((cls, name, vars(cls)[name]))
        setattr(cls, name, wrap(vars(cls)[name]))
    try:
        yield
    finally:
        for cls, name, original in patched:
            setattr(cls, name, original)


_PLAN_SWITCHES = ("TMA", "LOAD_T", "SPLIT_K", "REDUCE", "RANK_APART", "USE_ATOMIC", "DROPOUT")


def plan_of(launches: list[dict]) -> str:
    """``kernel_launches``' record in a line: each launch as ``name[tiles warps stages SWITCHES grid]``, e.g.
    ``fused_lora_mm[M128 N256 K64 R16 w8 s3 TMA grid 64x1]`` (the tiles by their ``BLOCK_`` letter)."""
    parts = []
    for launch in launches:
        name = launch["kernel"].strip("_").removesuffix("_kernel")
        fields = [f"{k.removeprefix('BLOCK_')}{v}" for k, v in launch.items() if k.startswith("BLOCK_")]
        fields += [f"{letter}{launch[k]}" for k, letter in (("num_warps", "w"), ("num_stages", "s")) if k in launch]
        fields += [k for k in _PLAN_SWITCHES if launch.get(k)]
        grid = launch["grid"]
        fields.append("grid " + ("x".join(map(str, grid)) if isinstance(grid, list) else str(grid)))
        parts.append(f"{name}[{' '.join(fields)}]")
    return " · ".join(parts)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def device_info(device_type: str) -> dict:
    """Device name and the versions that decide the numbers, stored with every result."""
    info = {
        "device": device_type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
    }
    if device_type == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = _cpu_name()
        info["threads"] = torch.get_num_threads()
    return info


def gpu_clocks(device: torch.device) -> dict:
    """CUDA: the SM clock (MHz) and the active throttle reasons (a bit mask, 0x0 for none) right after a case's
    timed rounds, from ``nvidia-smi`` (the GPU of ``device``'s index, 0 by default: one-GPU machines); empty
    elsewhere, or where it is missing, slow or unreadable. Nothing is pinned (the machine's clocks are left as
    they are): a ratio near a target's bound can be a clock's drift between nn.Linear's case and ours."""
    if device.type != "cuda":
        return {}
    query = "--query-gpu=clocks.sm,clocks_throttle_reasons.active"
    cmd = ["nvidia-smi", f"--id={device.index or 0}", query, "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=2).stdout
        clock, reasons = (field.strip() for field in out.strip().split(","))
        return {"sm_clock_mhz": int(clock), "throttle_reasons": reasons}
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
