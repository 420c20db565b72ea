"""Eager decode, as ``model.generate`` runs it without CUDA graphs: host time per adapted projection.

At decode a projection's GPU work lasts microseconds (a read of W), so what an eager step costs is often the
host's: Python, checks, config choice and the launches. ``test_bench_linear`` times decode through CUDA graphs,
which hide all of that; this benchmark shows it. One round calls a stack of ``LAYERS`` projections, each with
its own base weight (together larger than an H100's L2), one after another on one token under ``no_grad``:

- CUDA: the round runs from an idle GPU (after the L2 flush completes), so whichever is slower, the host's
  launch path or the GPU's work, sets its time; every provider runs for real, ``triton`` included.
- CPU: the fused kernels cannot run outside triton's interpreter, whose time means nothing, so the provider
  ``triton-host`` is the triton backend with its kernel launches replaced by no-ops: the library's own host
  path (checks, dispatch, configs, allocations) without triton's launch, the part this library controls.

Recorded per provider: the round's time and ``layers``; the report divides by it (time per projection) and
gives the ratio to ``nn.Linear``'s stack. (Not paired round by round with it on CPU, unlike the other
benchmarks: alternating two stacks of weights would time each one with a cold cache.)
"""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch
from torch import nn

from benchmarks import providers, timing
from benchmarks.conftest import DEVICE
from benchmarks.shapes import SHAPES
from tied_lora_kernels.kernels import forcing

LAYERS = 8
RANK = 16
SHAPE = SHAPES["llama2-7b.qkvo"] if DEVICE.type == "cuda" else SHAPES["llama2-7b.qkvo"].scaled(8)
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
HOST_ONLY = "triton-host"
# the fused kernels first after the floor: a phase that runs out of time (BENCH_TIME_BUDGET_S) skips the last
# providers. On CUDA also with the split-K partials summed inside the GEMM's launch (forcing.split_reduce)
FUSED = ("triton", "triton-1launch") if DEVICE.type == "cuda" else (HOST_ONLY,)
EAGER_PROVIDERS = (providers.FLOOR, *FUSED, "torch", "peft-lora", "peft-vera")

pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []


@contextlib.contextmanager
def _no_launches():
    """The triton backend on CPU tensors with every kernel launch a no-op (outputs stay uninitialised)."""
    from tied_lora_kernels import functional
    from tied_lora_kernels.kernels import backward, forward, prepare, shrink, split_sum

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    kernels = [
        (forward, "_fused_lora_mm_kernel"),
        (split_sum, "_sum_splits_kernel"),
        (split_sum, "_sum_splits_rank_kernel"),
        (shrink, "_shrink_kernel"),
        (prepare, "_prepare_kernel"),
        (backward, "_rank_grad_kernel"),
    ]
    saved = [(module, name, getattr(module, name)) for module, name in kernels]
    saved.append((functional, "_triton_unavailable", functional._triton_unavailable))
    try:
        for module, name in kernels:
            setattr(module, name, _NoLaunch())
        functional._triton_unavailable = lambda device: None  # CPU tensors pass for the backend's check
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _stack(provider: str) -> tuple[nn.Module, list[nn.Module]]:
    """``(owner, layers)``: ``LAYERS`` projections of ``SHAPE`` as the modules a model calls, each with its own
    frozen base weight: ``nn.Linear``; ``TiedLoRALinear`` (TL6 through ``apply_tied_lora``: one ``A``, ``B`` for
    the stack, ``u``, ``v`` per layer, fp32 masters); PEFT's LoRA or VeRA layers (``get_peft_model``)."""
    torch.manual_seed(0)
    owner = nn.Module()
    owner.layers = nn.ModuleList(
        nn.Linear(SHAPE.K, SHAPE.N, bias=False, device=DEVICE, dtype=DTYPE) for _ in range(LAYERS)
    )
    owner.requires_grad_(False)
    if provider in ("torch", *FUSED):
        from tied_lora_kernels import TiedLoRAConfig, apply_tied_lora

        backend = "torch" if provider == "torch" else "triton"
        config = TiedLoRAConfig(rank=RANK, preset="tl6", target_modules="all-linear", backend=backend)
        owner = apply_tied_lora(owner, config)
    elif provider in ("peft-lora", "peft-vera"):
        import peft

        targets = r"layers\.\d+"
        if provider == "peft-lora":
            config = peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, lora_dropout=0.0)
        else:
            config = peft.VeraConfig(r=RANK, target_modules=targets, vera_dropout=0.0)
        owner = peft.get_peft_model(owner, config)
        return owner, list(owner.base_model.model.layers)
    return owner, list(owner.layers)


def _step(layers: list[nn.Module], x: torch.Tensor):
    def step():
        with torch.no_grad():
            for layer in layers:
                layer(x)

    return step


@pytest.mark.parametrize("provider", EAGER_PROVIDERS)
def test_eager_decode(benchmark, provider: str):
    host_only = provider == HOST_ONLY
    if host_only:
        reason = None if importlib.util.find_spec("triton") else "triton is not installed"
    else:
        reason = providers.unavailable(provider, DEVICE)
    if reason:
        pytest.skip(reason)
    owner, layers = _stack(provider)
    x = torch.randn(1, SHAPE.K, generator=torch.Generator(device=DEVICE).manual_seed(1), device=DEVICE, dtype=DTYPE)
    benchmark.group = f"eager decode {SHAPE.name} {str(DTYPE).removeprefix('torch.')} x{LAYERS}"
    with _no_launches() if host_only else forcing.forced(**providers.TRITON_FORCED.get(provider, {})):
        how, _ = timing.run(benchmark, _step(layers, x), None, DEVICE, idle_start=True)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()  # (a fault of this case's kernels is this case's, not the next one's: warm-up)
    benchmark.extra_info.update(
        kind="eager",
        provider=provider,
        shape=SHAPE.name,
        K=SHAPE.K,
        N=SHAPE.N,
        M=1,
        rank=RANK if provider != providers.FLOOR else 0,
        layers=LAYERS,
        mode="decode-eager",
        dtype=str(DTYPE).removeprefix("torch."),
        timing=how,
        **timing.device_info(DEVICE.type),
    )
