"""``TiedLoRALinear``: a drop-in ``nn.Linear`` with a Tied-LoRA adapter.

The layer *is* an ``nn.Linear``: it keeps ``weight`` and ``bias`` (the same parameter objects when built with
``from_linear``, so no copy and unchanged state-dict keys) and adds

- ``shared``: the ``TiedLoRAShared`` holding the tied ``A`` and ``B`` (registered in every layer that uses
  it; PyTorch yields a shared parameter once);
- ``lora_u [rank]`` and ``lora_v [out]``: per-layer scaling vectors, ``None`` when frozen at one;
- ``b_rows``: the rows of ``shared.B`` this layer reads (grouped projections), ``None`` for all of them.

Forward: ``y = x Wᵀ + b + scale · (v ⊙ ((u ⊙ (x Aᵀ)) Bᵀ))`` with ``scale = alpha / rank``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tied_lora_kernels import reference
from tied_lora_kernels.functional import BACKENDS, tied_lora_linear
from tied_lora_kernels.shared import TiedLoRAShared

__all__ = ["TiedLoRALinear"]


class TiedLoRALinear(nn.Linear):
    """``nn.Linear`` plus ``scale · diag(v) · B · diag(u) · A`` with ``A``, ``B`` from a ``TiedLoRAShared``.

    Build it like ``nn.Linear`` with a ``shared=`` argument, or adapt an existing layer with
    ``TiedLoRALinear.from_linear(linear, shared)``. ``u_init``/``v_init`` start the trained vectors; a frozen
    vector starting at one is stored as ``None`` (no memory, no work). Pass ``u=`` to use another layer's
    ``u`` (the grouping of q, k and v in one layer), ``b_rows=(start, stop)`` to read rows of a grouped B.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        shared: TiedLoRAShared,
        alpha: float | None = None,
        train_u: bool = True,
        train_v: bool = True,
        u_init: float = 1.0,
        v_init: float = 0.0,
        u: nn.Parameter | None = None,
        b_rows: tuple[int, int] | None = None,
        backend: str = "auto",
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_adapter(shared, alpha, train_u, train_v, u_init, v_init, u, b_rows, backend)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        shared: TiedLoRAShared,
        *,
        alpha: float | None = None,
        train_u: bool = True,
        train_v: bool = True,
        u_init: float = 1.0,
        v_init: float = 0.0,
        u: nn.Parameter | None = None,
        b_rows: tuple[int, int] | None = None,
        backend: str = "auto",
    ) -> TiedLoRALinear:
        """Adapt ``linear`` in place of it: its ``weight`` and ``bias`` parameters are reused, not copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, TiedLoRALinear):
            raise TypeError("this layer already has a Tied-LoRA adapter")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.training = linear.training
        layer._init_adapter(shared, alpha, train_u, train_v, u_init, v_init, u, b_rows, backend)
        return layer

    def _init_adapter(self, shared, alpha, train_u, train_v, u_init, v_init, u, b_rows, backend):
        if not isinstance(shared, TiedLoRAShared):
            raise TypeError(f"shared must be a TiedLoRAShared, got {type(shared).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if shared.in_features != self.in_features:
            raise ValueError(
                f"shared A is [{shared.rank}, {shared.in_features}] but the layer has in_features={self.in_features}"
            )
        start, stop = b_rows if b_rows is not None else (0, shared.out_features)
        if not (0 <= start < stop <= shared.out_features) or stop - start != self.out_features:
            raise ValueError(
                f"the layer has out_features={self.out_features} but reads rows [{start}, {stop}) of shared B "
                f"[{shared.out_features}, {shared.rank}]"
            )
        self.shared = shared
        self.b_rows = None if (start, stop) == (0, shared.out_features) else (start, stop)
        self.rank = shared.rank
        self.alpha = float(shared.rank if alpha is None else alpha)
        self.scale = self.alpha / shared.rank
        self.backend = backend
        self.merged = False
        factory = {"device": shared.A.device, "dtype": shared.A.dtype}

        if u is not None:
            if tuple(u.shape) != (shared.rank,):
                raise ValueError(f"u must be [{shared.rank}], got shape {tuple(u.shape)}")
            if u.requires_grad != train_u:
                state = "trains" if u.requires_grad else "is frozen"
                raise ValueError(f"the u passed in {state}, but train_u={train_u}")
            self.lora_u = u
        elif train_u or u_init != 1.0:
            self.lora_u = nn.Parameter(torch.full((shared.rank,), float(u_init), **factory), requires_grad=train_u)
        else:
            self.register_parameter("lora_u", None)
        if train_v or v_init != 1.0:
            self.lora_v = nn.Parameter(
                torch.full((self.out_features,), float(v_init), **factory), requires_grad=train_v
            )
        else:
            self.register_parameter("lora_v", None)

    @property
    def lora_B(self) -> Tensor:
        """This layer's rows of the shared ``B`` (a view: gradients reach the shared parameter)."""
        B = self.shared.B
        return B if self.b_rows is None else B[self.b_rows[0] : self.b_rows[1]]

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        return tied_lora_linear(
            x,
            self.weight,
            self.bias,
            self.shared.A,
            self.lora_B,
            self.lora_u,
            self.lora_v,
            self.scale,
            backend=self.backend,
        )

    def delta_weight(self) -> Tensor:
        """``ΔW = scale · diag(v) · B · diag(u) · A``, ``[out, in]``, in the adapter's dtype."""
        return reference.delta_weight(self.shared.A, self.lora_B, self.lora_u, self.lora_v, self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into ``weight`` (computed in float32, rounded once); forward then costs a plain linear."""
        if self.merged:
            raise RuntimeError("this TiedLoRALinear is already merged; unmerge() it first")
        self._add_delta(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ΔW back out of ``weight``: exact up to the rounding of ``weight``'s dtype."""
        if not self.merged:
            raise RuntimeError("this TiedLoRALinear is not merged")
        self._add_delta(-1.0)
        self.merged = False

    def _add_delta(self, sign: float) -> None:
        # weight ± ΔW in at least float32, rounded once to weight's dtype
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        delta = reference.delta_weight(
            self.shared.A, self.lora_B, self.lora_u, self.lora_v, sign * self.scale, dtype=dtype
        )
        self.weight.copy_(self.weight.to(dtype) + delta)

    def extra_repr(self) -> str:
        trained = [
            n
            for n, p in (("A", self.shared.A), ("B", self.shared.B), ("u", self.lora_u), ("v", self.lora_v))
            if p is not None and p.requires_grad
        ]
        rows = "" if self.b_rows is None else f", b_rows={self.b_rows}"
        return (
            f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, "
            f"trains={'+'.join(trained) or 'nothing'}{rows}, backend={self.backend}, merged={self.merged}"
        )
