"""One adapted projection, providers × modes × named shapes (Liger-style), timed with pytest-benchmark.

Modes: ``forward`` (inference, under no_grad; the only mode at decode M <= 16), ``backward`` (the
backward of a training step alone; its forward runs untimed before each round), ``fwd+bwd`` (frozen
base, trainable adapter, ``x`` requires grad as inside a network). Each result's ``extra_info`` carries
provider, shape, tokens, FLOPs, bytes, memory, dtype, device and versions, so ``python -m
tied_lora_kernels bench`` can read it as TFLOP/s, GB/s and a ratio to ``nn.Linear``; on CUDA at the targets'
K = N = 4096 also the SM clock and throttle reasons right after the timed rounds (``timing.gpu_clocks``). The fused
providers' also carry the triton kernels one projection launched (``launches``, and ``plan`` in a line:
``timing.kernel_launches``), which the report checks its strategy, loads and split-K comparisons against.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import providers, timing
from benchmarks.conftest import DEVICE
from benchmarks.shapes import DECODE_MAX_M, flops, linear_cases, min_bytes
from tied_lora_kernels.bench_tables import TARGET_K

CASES = {case.id: case for case in linear_cases(DEVICE.type)}


def _params():
    params = []
    for provider, case, test_id in providers.schedule(CASES.values()):
        marks = [pytest.mark.slow] if case.slow else []
        if DEVICE.type == "cuda" or provider == "triton":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(provider, case.id, id=test_id, marks=marks))
    return params


def _mode_fns(built: providers.Built, x: torch.Tensor, dy: torch.Tensor, mode: str):
    """``(setup, fn)`` of one round of ``mode`` for a built provider; ``setup`` runs untimed."""
    if mode == "forward":

        def forward():
            with torch.no_grad():
                built.fn(x)

        return None, forward

    def clear_grads():
        for t in (x, *built.trainable):
            t.grad = None

    if mode == "fwd+bwd":
        return clear_grads, lambda: built.fn(x).backward(dy)
    state = {}

    def forward_untimed():
        clear_grads()
        state["y"] = built.fn(x)

    return forward_untimed, lambda: state.pop("y").backward(dy)


@pytest.mark.parametrize(("provider", "case_id"), _params())
def test_linear(benchmark, provider: str, case_id: str):
    case = CASES[case_id]
    reason = providers.unavailable(provider, DEVICE)
    if reason:
        pytest.skip(reason)
    shape, M, dtype, mode = case.shape, case.M, case.dtype, case.mode
    adapter = provider != providers.FLOOR
    rank = case.rank if adapter else 0
    built = providers.build(provider, shape, case.rank, dtype, DEVICE)
    elem = torch.empty((), dtype=dtype).element_size()
    graph = mode == "forward" and M <= DECODE_MAX_M
    # decode on CUDA: a round runs `copies` projections, each with a weight of its own (see timing.py)
    copies = timing.weight_copies(shape.N * shape.K * elem, DEVICE) if graph and not benchmark.disabled else 1
    single = built
    if copies > 1:
        rest = [providers.build(provider, shape, case.rank, dtype, DEVICE) for _ in range(copies - 1)]
        built = providers.rotating([built, *rest])
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(M, shape.K, generator=gen, device=DEVICE, dtype=dtype).requires_grad_(mode != "forward")
    dy = torch.randn(M, shape.N, generator=gen, device=DEVICE, dtype=dtype)
    setup, fn = _mode_fns(built, x, dy, mode)
    saved = None
    if mode != "forward":
        saved = timing.saved_bytes(lambda: built.fn(x), exclude=built.frozen + built.trainable)
    paired = None
    if adapter and (DEVICE.type == "cpu" or not graph) and not benchmark.disabled:  # round by round (timing.run)
        floor = providers.build(providers.FLOOR, shape, case.rank, dtype, DEVICE)
        paired = _mode_fns(floor, x, dy, mode)

    benchmark.group = f"{shape.name} {str(dtype).removeprefix('torch.')} {mode} M={M}"  # read by run()
    how, floor_s = timing.run(benchmark, fn, setup, DEVICE, graph=graph, paired=paired, calls=copies)
    # the SM clock right after the timed rounds, at the targets' shape (nvidia-smi, ~30 ms a call)
    at_target = shape.K == shape.N == TARGET_K and not benchmark.disabled
    clocks = timing.gpu_clocks(DEVICE) if at_target else {}
    one_setup, one_fn = _mode_fns(single, x, dy, mode)
    peak = timing.cuda_peak_bytes(one_fn, one_setup, DEVICE)  # one projection's
    # the fused providers: the kernels one (untimed) projection launches, with their tiles and switches
    ours = provider in providers.TRITON_FORCED or provider == "triton-dropout"
    launches = timing.kernel_launches(one_fn, one_setup) if ours and not benchmark.disabled else None

    benchmark.extra_info.update(
        kind="linear",
        provider=provider,
        shape=shape.name,
        K=shape.K,
        N=shape.N,
        M=M,
        tokens=M,
        rank=rank,
        mode=mode,
        dtype=str(dtype).removeprefix("torch."),
        flops=flops(M, shape.K, shape.N, rank, mode, adapter),
        bytes=min_bytes(M, shape.K, shape.N, rank, mode, elem, adapter),
        saved_bytes=saved,
        peak_bytes=peak,
        adapter_dtype=built.adapter_dtype,
        timing=how,
        weight_copies=copies,
        paired_floor=floor_s,
        launches=launches,
        plan=timing.plan_of(launches) if launches is not None else None,
        tier="slow" if case.slow else "default",
        **clocks,
        **timing.device_info(DEVICE.type),
    )
