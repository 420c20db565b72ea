"""What a user could run instead of our fused kernels, built for one shape: the benchmark providers.

Each provider is one adapted projection ``x [M, K] -> y [M, N]`` with a frozen base weight in the compute
dtype and a trainable adapter at the same rank:

- ``nn.Linear``: the base layer alone, the floor every ratio is taken against;
- ``torch``: ``tied_lora_linear(..., backend="torch")``, TL6 (A, B, u, v trained, fp32 masters);
- ``torch.compile``: the same function under ``torch.compile(dynamic=True)``;
- ``peft-lora`` / ``peft-vera``: HuggingFace PEFT's LoRA and VeRA layers with PEFT's defaults
  (``get_peft_model``: adapters upcast to fp32, dropout 0);
- ``triton``: ``tied_lora_linear(..., backend="triton")``, the fused kernels (CUDA only), with the strategy
  ``kernels/configs.py`` picks per shape (its table is an unmeasured estimate until these runs replace it);
- ``triton-1pass`` / ``triton-2pass``: the same with the one-pass or the two-pass (shrink, then the GEMM
  seeded with the rank-R product) fused GEMM forced, forward and backward alike (docs/design.md §3);
- ``triton-ptr``: the same with pointer loads forced where the default loads through TMA descriptors (16-bit
  prefill on Hopper; prefill cases only, decode never uses TMA), to measure what TMA buys;
- ``triton-1launch``: the same with split-K partials summed inside the GEMM's launch by each tile's last K
  slice instead of by a second launch (``forcing.split_reduce``; decode cases only, prefill never splits K);
- ``triton-intile``: the same with one-pass split-K computing its rank-R term in every output tile's programs
  instead of apart (``forcing.split_rank``: ``t`` per K slice by programs of its own, expanded by the sum
  launch); decode cases only, to measure what computing ``t`` apart buys;
- ``triton-dropout`` / ``peft-lora-dropout``: ``triton`` and ``peft-lora`` with adapter dropout ``DROPOUT``
  (the kernels draw their mask in the forward's shrink; PEFT runs ``nn.Dropout`` on ``x``), training modes only.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from benchmarks.shapes import DECODE_MAX_M, Case, Shape
from tied_lora_kernels import tied_lora_linear
from tied_lora_kernels.bench_tables import TARGET_K

__all__ = ["PROVIDERS", "FLOOR", "Built", "schedule", "unavailable", "build", "rotating"]

FLOOR = "nn.Linear"
TRITON_FORCED = {
    "triton": {},
    "triton-1pass": dict(strategy="one_pass"),
    "triton-2pass": dict(strategy="two_pass"),
    "triton-ptr": dict(tma=False),
    "triton-1launch": dict(reduce="kernel"),
    "triton-intile": dict(split_rank="in_tile"),
}
"""Each fused-kernel provider and what it forces (``forcing.forced``; nothing: the tables' choices)."""
PREFILL_ONLY = ("triton-ptr",)
"""Providers that decode cases skip (they would run the same kernel as ``triton`` there)."""
DECODE_ONLY = ("triton-1launch", "triton-intile")
"""Providers that prefill cases skip (the same kernels as ``triton`` there)."""
DROPOUT = 0.1
"""The adapter dropout of the dropout providers (PEFT's examples use 0.05-0.1)."""
TRAINING_ONLY = ("triton-dropout", "peft-lora-dropout")
"""Providers that forward (inference) cases skip: dropout is off in evaluation."""
PROVIDERS = (FLOOR, "torch", "torch.compile", "peft-lora", "peft-vera", *TRITON_FORCED, *TRAINING_ONLY)


def schedule(cases: Iterable[Case]) -> list[tuple[str, Case, str]]:
    """``(provider, case, test id)`` of every linear benchmark, in the order they run: at issue 3's targets' shape
    (K = N = TARGET_K) first what the targets table reads (nn.Linear, the torch path, the fused kernels as the
    tables choose), then the forced-choice providers, then the rest (torch.compile, PEFT, dropout), then the other
    shapes, the slow tier last; the grid's order within each. A time budget (gpu_check.sh) then cuts what matters
    least. ``nn.Linear`` runs once per shape, M, dtype and mode (its id without the rank)."""
    runs, floors = [], set()
    for case in cases:
        for provider in PROVIDERS:
            if provider in PREFILL_ONLY and case.M <= DECODE_MAX_M:
                continue
            if provider in DECODE_ONLY and case.M > DECODE_MAX_M:
                continue
            if provider in TRAINING_ONLY and case.mode == "forward":
                continue
            test_id = f"{provider}-{case.id}"
            if provider == FLOOR:  # rank-independent
                key = (case.shape, case.M, case.dtype, case.mode)
                if key in floors:
                    continue
                floors.add(key)
                test_id = test_id.replace(f"-r{case.rank}-", "-")
            if case.shape.K != TARGET_K or case.shape.N != TARGET_K:
                group = 3
            elif provider in (FLOOR, "torch", "triton"):
                group = 0
            else:
                group = 1 if provider in TRITON_FORCED else 2
            runs.append(((case.slow, group), (provider, case, test_id)))
    return [run for _, run in sorted(runs, key=lambda pair: pair[0])]  # (a stable sort)


@dataclass
class Built:
    """A provider ready to run: ``fn(x) -> y``, its trainable tensors and the frozen ones it holds."""

    fn: Callable[[Tensor], Tensor]
    trainable: list[Tensor] = field(default_factory=list)
    frozen: list[Tensor] = field(default_factory=list)
    adapter_dtype: str = "-"
    owner: object = None  # what must stay alive while fn runs (PEFT's model owns VeRA's shared buffers)


def rotating(builts: list[Built]) -> Built:
    """One provider's copies called in turn on the same ``x`` (a decode round over weights of their own, as a
    model's layers): returns the last output."""

    def fn(x: Tensor) -> Tensor:
        for b in builts:
            y = b.fn(x)
        return y

    first = builts[0]
    return Built(
        fn,
        trainable=[t for b in builts for t in b.trainable],
        frozen=[t for b in builts for t in b.frozen],
        adapter_dtype=first.adapter_dtype,
        owner=[b.owner for b in builts],
    )


def unavailable(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run on ``device`` (a skip reason), or None."""
    if provider.startswith("peft-") and importlib.util.find_spec("peft") is None:
        return "peft is not installed"
    if provider in TRITON_FORCED or provider == "triton-dropout":
        if device.type != "cuda":
            return "the fused kernels are benchmarked on CUDA only (the CPU interpreter is not timed)"
        from tied_lora_kernels import kernels

        reason = kernels.unavailable_reason(device)
        if reason:
            return reason
        if not hasattr(kernels, "tied_lora_linear_triton"):
            return "tied_lora_kernels.kernels has no tied_lora_linear_triton yet"
    if provider == "torch.compile" and device.type == "cpu" and not _has_cxx():
        return "torch.compile on CPU needs a C++ compiler"
    return None


@functools.cache
def _has_cxx() -> bool:
    import shutil

    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def build(provider: str, shape: Shape, rank: int, dtype: torch.dtype, device: torch.device) -> Built:
    """``provider`` for ``shape`` at ``rank``: base weight in ``dtype`` (frozen, no bias, LLaMA-style)."""
    gen = torch.Generator(device=device).manual_seed(0)  # on the device: fast for the large GPU shapes
    K, N = shape.K, shape.N
    weight = (torch.randn(N, K, generator=gen, device=device) / K**0.5).to(dtype)
    if provider == FLOOR:
        return Built(lambda x: nn.functional.linear(x, weight), frozen=[weight])
    if provider in ("torch", "torch.compile", "triton-dropout", *TRITON_FORCED):
        return _build_tied(provider, weight, rank, gen)
    if provider in ("peft-lora", "peft-vera", "peft-lora-dropout"):
        return _build_peft(provider, weight, rank)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def _build_tied(provider: str, weight: Tensor, rank: int, gen: torch.Generator) -> Built:
    N, K = weight.shape
    device = weight.device

    def master(*size, std):  # fp32 master weights, as TiedLoRAConfig keeps them (docs/design.md §4)
        return (torch.randn(*size, generator=gen, device=device) * std).requires_grad_()

    A, B = master(rank, K, std=K**-0.5), master(N, rank, std=rank**-0.5)
    u, v = master(rank, std=1.0), master(N, std=0.1)
    backend = "triton" if provider.startswith("triton") else "torch"
    dropout = DROPOUT if provider in TRAINING_ONLY else 0.0
    fn = _compiled_tied() if provider == "torch.compile" else tied_lora_linear
    if TRITON_FORCED.get(provider):
        from tied_lora_kernels.kernels import forcing

        def forward(x: Tensor) -> Tensor:
            # the autograd Function keeps a forced strategy, split and loads for its backward (kernels/function.py);
            # the split-K sum and split_rank are read at each launch (triton-1launch and triton-intile run decode
            # cases, forward only)
            with forcing.forced(**TRITON_FORCED[provider]):
                return fn(x, weight, None, A, B, u, v, 1.0, backend=backend)
    else:

        def forward(x: Tensor) -> Tensor:
            return fn(x, weight, None, A, B, u, v, 1.0, backend=backend, dropout=dropout)

    return Built(forward, trainable=[A, B, u, v], frozen=[weight], adapter_dtype="float32")


@functools.cache
def _compiled_tied():
    # One compiled callable for every test: dynamic shapes, so new M/K/N/R reuse graphs where dynamo can
    # (duck sizing and 0/1 specialisation still recompile a few times); a high limit keeps dynamo from
    # silently falling back to eager after 8 recompiles.
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    return torch.compile(tied_lora_linear, dynamic=True)


class _Wrap(nn.Module):
    def __init__(self, weight: Tensor):
        super().__init__()
        N, K = weight.shape
        self.proj = nn.Linear(K, N, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def _build_peft(provider: str, weight: Tensor, rank: int) -> Built:
    import peft

    if provider in ("peft-lora", "peft-lora-dropout"):
        dropout = DROPOUT if provider in TRAINING_ONLY else 0.0
        config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"], lora_dropout=dropout)
    else:
        config = peft.VeraConfig(r=rank, target_modules=["proj"], vera_dropout=0.0)
    model = peft.get_peft_model(_Wrap(weight), config)
    layer = model.base_model.model.proj  # time the adapted layer itself, not PeftModel's wrapper
    trainable = [p for p in layer.parameters() if p.requires_grad]
    frozen = [p for p in layer.parameters() if not p.requires_grad] + list(model.buffers())
    with torch.no_grad():  # PEFT starts LoRA's B and VeRA's b at zero; give them values like a trained adapter
        for p in trainable:
            p.normal_(0, 0.02)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainable})
    return Built(layer, trainable=trainable, frozen=frozen, adapter_dtype="/".join(dtypes), owner=model)
