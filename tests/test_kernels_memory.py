"""Activation memory kept for backward per layer (issue 3): at most x plus 4·M·R bytes when A trains, at
most 4·M·R bytes when A is frozen (VeRA-style), counted with ``saved_tensors_hooks``; adapter dropout adds its
mask as bits, M·ceil(K/8) bytes, and nothing else.

Parameters (W, b, A, B, u, v) are saved by reference and cost no memory; everything else the layer keeps
for backward is counted.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DEVICE
from tied_lora_kernels.functional import tied_lora_linear

M, K, N, R = 33, 40, 56, 8


def saved_activation_bytes(x, params, dropout=0.0) -> tuple[int, list]:
    """Bytes of the tensors one forward saves for backward, parameters excluded."""
    param_ptrs = {(p.data_ptr(), p.numel(), p.dtype) for p in params.values() if p is not None}
    saved = []

    def pack(t):
        if (t.data_ptr(), t.numel(), t.dtype) not in param_ptrs:
            saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        args = (params[k] for k in ("weight", "bias", "A", "B", "u", "v"))
        y = tied_lora_linear(x, *args, backend="triton", dropout=dropout)
    y.sum().backward()  # the saved tensors are usable
    nbytes = sum(torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size() for shape, dt in saved)
    return nbytes, saved


def layer_inputs(dtype: torch.dtype, train) -> tuple[torch.Tensor, dict]:
    """``x [M, K]`` (requiring grad) and the layer's ``weight, bias`` in ``dtype``, fp32 ``A, B, u, v``; the factors
    named in ``train`` require grad."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    params = {
        "weight": torch.randn(N, K, generator=g).to(dtype).to(DEVICE),
        "bias": torch.randn(N, generator=g).to(dtype).to(DEVICE),
        "A": torch.randn(R, K, generator=g).to(DEVICE),
        "B": torch.randn(N, R, generator=g).to(DEVICE),
        "u": torch.randn(R, generator=g).to(DEVICE),
        "v": torch.randn(N, generator=g).to(DEVICE),
    }
    for name in train:
        params[name].requires_grad_(True)
    return x, params


@pytest.mark.parametrize(
    "train,bound",
    [
        (("A", "B", "u", "v"), "x+T"),  # TL6
        (("A", "B"), "x+T"),  # TL5 / LoRA
        (("u", "v"), "T"),  # VeRA: A frozen, x not kept
        (("B",), "T"),  # A frozen, B trained
        (("A",), "x+T"),
        ((), "none"),  # only x trains: nothing but parameters is kept
    ],
)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_saved_for_backward(train, bound, dtype, dropout):
    x, params = layer_inputs(dtype, train)
    nbytes, saved = saved_activation_bytes(x, params, dropout)
    x_bytes, t_bytes = x.numel() * x.element_size(), 4 * M * R
    limit = {"x+T": x_bytes + t_bytes, "T": t_bytes, "none": 0}[bound]
    limit += M * -(-K // 8) if dropout else 0
    assert nbytes <= limit, f"saved {nbytes} bytes > {limit} ({saved})"
    if {"B", "u", "v"} & set(train):  # T = x Aᵀ, kept in fp32 whatever x's dtype (issue 3)
        assert ((M, R), torch.float32) in saved, saved


@pytest.mark.parametrize("train,kept", [(("A", "B", "u", "v"), True), (("u", "v"), False), (("B",), False)])
def test_x_is_kept_only_when_a_trains(train, kept):
    """The bound above counts what ``save_for_backward`` keeps; this also catches ``x`` kept any other way (a tensor
    stashed on the autograd context, a closure): with ``A`` frozen nothing may hold it once the caller lets go."""
    import gc
    import weakref

    x0, params = layer_inputs(torch.float32, train)
    x = x0 * 2.0  # (a non-leaf: its own graph node keeps nothing of it)
    alive = weakref.ref(x)
    y = tied_lora_linear(x, *(params[k] for k in ("weight", "bias", "A", "B", "u", "v")), backend="triton")
    del x
    gc.collect()
    assert (alive() is not None) == kept
    y.sum().backward()
    assert all(params[name].grad is not None for name in train)
