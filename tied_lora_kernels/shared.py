"""``TiedLoRAShared``: the one owner of a tied low-rank pair ``A [rank, in]``, ``B [out, rank]``.

Every ``TiedLoRALinear`` of a tie group holds (and registers) the same ``TiedLoRAShared`` module, so all of
them use the same two ``nn.Parameter`` objects: one optimizer step updates one tensor, ``.to()``/``.half()``
keep them tied (PyTorch converts a parameter in place, keeping its identity), and ``model.parameters()``
yields them once. When several projections are grouped (q, k and v of a layer), ``out_features`` is the sum
of theirs and each layer reads its own rows of ``B`` — the paper's fused-QKV setup.
"""

from __future__ import annotations

import math
from numbers import Integral

import torch
from torch import nn

from tied_lora_kernels.functional import check_rank, check_seed, is_number, shown

__all__ = ["TiedLoRAShared", "INITS", "check_features", "check_float_dtype"]

# How A and B are drawn: "gaussian" N(0, 1) (the Tied-LoRA authors' NeMo code), "kaiming" kaiming-uniform
# with a = sqrt(5), bound 1/sqrt(fan_in) (LoRA's A in PEFT, and VeRA's A and B).
INITS = ("gaussian", "kaiming")


def check_features(in_features: int, out_features: int) -> None:
    for name, n in (("in_features", in_features), ("out_features", out_features)):
        if not is_number(n, Integral) or n <= 0:
            raise ValueError(f"{name} must be a positive int, got {shown(n)}")
        if n >= 2**63:
            raise ValueError(f"{name} must be below 2**63 (a tensor's size), got {shown(n)}")


def check_float_dtype(dtype: torch.dtype, what: str) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{what} must be a floating-point torch.dtype, got {dtype!r}")


class TiedLoRAShared(nn.Module):
    """Owns ``A [rank, in_features]`` and ``B [out_features, rank]`` for one tie group.

    ``init`` draws both matrices (see ``INITS``); ``zero_B=True`` starts B at zero instead (the zero start of
    configurations whose ``v`` is frozen at one), ``zero_A=True`` starts A at zero (the zero start where A alone
    trains). ``train_A`` and ``train_B`` (both True) set which of them require grad. ``seed`` makes the draw
    reproducible on any device (it is made on the CPU with its own generator, then copied). Adapters default to
    float32 master weights.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        train_A: bool = True,
        train_B: bool = True,
        init: str = "gaussian",
        zero_B: bool = False,
        zero_A: bool = False,
        seed: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_features(in_features, out_features)
        check_rank(rank)
        for name, flag in (("train_A", train_A), ("train_B", train_B), ("zero_A", zero_A), ("zero_B", zero_B)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if seed is not None:
            check_seed(seed)
        in_features, out_features, rank = int(in_features), int(out_features), int(rank)
        seed = None if seed is None else int(seed)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        dtype = dtype or torch.float32
        check_float_dtype(dtype, "adapter dtype")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.init, self.seed, self.zero_A, self.zero_B = init, seed, zero_A, zero_B
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype), requires_grad=train_A)
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype), requires_grad=train_B)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw A and B as at construction (the same values when seeded): also the way to initialise a
        pair created on the meta device, after ``to_empty()``."""
        if self.A.is_meta:
            return
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        for param, zero in ((self.A, self.zero_A), (self.B, self.zero_B)):
            if zero:
                param.zero_()
                continue
            value = torch.empty(param.shape, dtype=torch.float32, device="cpu")  # the CPU generator draws
            if self.init == "gaussian":
                value.normal_(0.0, 1.0, generator=generator)
            else:  # kaiming-uniform with a = sqrt(5): bound = 1 / sqrt(fan_in), fan_in = param.shape[1]
                bound = 1.0 / math.sqrt(param.shape[1])
                value.uniform_(-bound, bound, generator=generator)
            param.copy_(value)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"train_A={self.A.requires_grad}, train_B={self.B.requires_grad}, dtype={self.A.dtype}"
        )
