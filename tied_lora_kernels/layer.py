"""``TiedLoRALinear``: a drop-in ``nn.Linear`` with a Tied-LoRA adapter.

The layer *is* an ``nn.Linear``: it keeps ``weight`` and ``bias`` (the same parameter objects when built with
``from_linear``, so no copy and unchanged state-dict keys) and adds

- ``shared``: the ``TiedLoRAShared`` holding the tied ``A`` and ``B`` (registered in every layer that uses
  it; PyTorch yields a shared parameter once);
- ``lora_scale``: the ``UScale`` owning ``u [rank]`` — the layer's own, or the one the grouped projections of a
  layer share (q, k and v) — and ``lora_v [out]``; a vector frozen at one is ``None`` (no memory, no work);
- ``b_rows``: the rows of ``shared.B`` this layer reads (grouped projections), ``None`` for all of them;
- ``merged`` (ΔW folded into ``weight``) and ``disabled`` (the adapter skipped: ``disable_tied_lora``); either
  makes forward the base layer's own (a plain ``F.linear`` for an ``nn.Linear``).

Subclasses keep other bases' computation: ``TiedLoRAConv1D`` (GPT-2's ``Conv1D``, weight ``[in, out]``),
``TiedLoRAFalconLinear`` (Falcon's linear, bias added apart) and the quantized ``TiedLoRALinear4bit``, ... .

Shared pieces are modules, never bare parameters registered twice, so ties survive every conversion
(``.to()``, ``.half()``, ``deepcopy``, even with ``torch.__future__`` overwrite-on-conversion).

Forward: ``y = x Wᵀ + b + scale · (v ⊙ ((u ⊙ (x Aᵀ)) Bᵀ))`` with ``scale = alpha / rank``.
"""

from __future__ import annotations

import importlib
import numbers
import warnings
from collections.abc import Mapping
from typing import Any, TypedDict

import torch
from torch import Tensor, nn
from typing_extensions import Unpack  # (typing's from Python 3.11; imported at run time for get_type_hints)

from tied_lora_kernels import reference
from tied_lora_kernels.base_layers import (
    MODULE_HOOKS,
    QUANTIZED_NAMES,
    carry_hooks,
    check_linear_type,
    check_plain_weight,
    class_label,
    conv1d_type,
    falcon_linear_type,
    linear_features,
    quantized_linear_types,
)
from tied_lora_kernels.functional import (
    BACKENDS,
    add_adapter,
    check_backend_rank,
    check_dropout,
    is_finite,
    shown,
    tied_lora_linear,
)
from tied_lora_kernels.shared import TiedLoRAShared, check_features, check_float_dtype

__all__ = ["AdapterOptions", "TiedLoRAConv1D", "TiedLoRAFalconLinear", "TiedLoRALinear", "UScale"]


class AdapterOptions(TypedDict, total=False):
    """The adapter keywords of ``TiedLoRALinear(...)`` and ``TiedLoRALinear.from_linear(...)``, typed for IDEs
    and type checkers (``**adapter: Unpack[AdapterOptions]``); their meanings and defaults are in
    ``TiedLoRALinear``'s docstring (``_init_adapter`` takes them; a test keeps the two alike)."""

    alpha: float | None
    train_u: bool
    train_v: bool
    u_init: float
    v_init: float | None
    share_u_with: TiedLoRALinear | None
    b_rows: tuple[int, int] | None
    backend: str
    dropout: float


def _check_adapter_keywords(adapter: Mapping[str, Any]) -> None:
    """Refuse a keyword the adapter does not take (a misspelt ``train_u``), naming those it takes."""
    known = AdapterOptions.__annotations__.keys()  # (_init_adapter's keywords, kept alike by a test)
    unknown = sorted(set(adapter) - known)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; the adapter takes {sorted(known)}")


def _warn_if_it_cannot_train(shared: TiedLoRAShared, lora_scale: UScale, train_v: bool, v_init: float) -> None:
    """Warn of a start from which no factor of ``ΔW = s·diag(v)·B·diag(u)·A`` ever gets a gradient: each factor's
    gradient is a product of the three others, so two factors at zero, or one frozen at zero, leave every gradient
    zero for good (a hand-built layer; the configs start exactly one trained factor at zero)."""
    trains = {"A": shared.A.requires_grad, "B": shared.B.requires_grad, "v": train_v}
    trains["u"] = lora_scale.u is not None and lora_scale.u.requires_grad
    zero = {"A": shared.zero_A, "B": shared.zero_B, "u": lora_scale.init == 0.0, "v": v_init == 0.0}
    zeros = [name for name in ("A", "B", "u", "v") if zero[name]]
    if any(trains.values()) and (len(zeros) > 1 or (zeros and not trains[zeros[0]])):
        what = " and ".join(zeros) + (" start" if len(zeros) > 1 else " starts frozen")
        warnings.warn(
            f"this TiedLoRALinear's {what} at zero: every gradient of the adapter (a product of the other three "
            "factors) is zero, so it never trains. Start one trained factor only at zero (v_init=1.0 for a frozen "
            "v, or a pair without zero_A/zero_B)",
            stacklevel=4,
        )


_QUANTIZED_CLASSES: dict[type, type] = {}


def _quantized_class(base: type) -> type[TiedLoRALinear]:
    """``TiedLoRALinear`` over the quantized ``base`` class: the adapter's code, then ``base``'s forward and
    state-dict methods (which save and load the quantisation state under the layer's usual keys)."""
    if base not in _QUANTIZED_CLASSES:
        name = f"TiedLoRA{base.__name__}"
        cls = type(name, (TiedLoRALinear, base), {"__module__": __name__, "quantized": True, "base_class": base})
        globals()[name] = cls  # importable by name, for pickle
        _QUANTIZED_CLASSES[base] = cls
    return _QUANTIZED_CLASSES[base]


def __getattr__(name: str) -> type:
    """``TiedLoRALinear4bit`` and the like, made on first use: what a pickled adapted quantized layer names."""
    if name.startswith("TiedLoRA") and name.removeprefix("TiedLoRA") in QUANTIZED_NAMES:
        try:
            import bitsandbytes  # noqa: F401  (the pickle holds bitsandbytes objects anyway)
        except ImportError:
            raise AttributeError(f"{__name__}.{name} needs bitsandbytes, which is not installed") from None
        for base in quantized_linear_types():
            if name == f"TiedLoRA{base.__name__}":
                return _quantized_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class UScale(nn.Module):
    """Owns one ``u [rank]`` starting at ``init``: a trained parameter, a frozen one, or ``None`` (ones)."""

    u: nn.Parameter | None
    init: float

    def __init__(self, rank: int, *, train: bool, init: float, device=None, dtype=None):
        super().__init__()
        if not isinstance(train, bool):
            raise TypeError(f"train_u must be True or False, got {train!r}")
        if isinstance(init, bool) or not isinstance(init, numbers.Real) or not is_finite(init):
            raise ValueError(f"u_init must be a finite number, got {shown(init)}")
        self.init = float(init)
        if train or init != 1.0:
            self.u = nn.Parameter(torch.empty(rank, device=device, dtype=dtype), requires_grad=train)
        else:
            self.register_parameter("u", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.u is not None:
            self.u.fill_(self.init)


class TiedLoRALinear(nn.Linear):
    """``nn.Linear`` plus ``scale · diag(v) · B · diag(u) · A`` with ``A``, ``B`` from a ``TiedLoRAShared``.

    Build it like ``nn.Linear`` with a ``shared=`` argument (a pair tied with other layers) or ``rank=`` (a
    float32 pair of its own), or adapt an existing layer with ``TiedLoRALinear.from_linear(linear, shared)`` (or
    ``rank=``). Adapter keywords (both constructors):

    - ``alpha`` (default ``rank``; ``scale = alpha / rank``), ``backend`` (``"auto"``, ``"torch"``,
      ``"triton"``);
    - ``train_u``, ``train_v`` (both True) and their start values ``u_init`` (1), ``v_init`` (None: 0 for a trained
      ``v``, the zero start, 1 for a frozen one, not stored);
    - ``share_u_with``: another ``TiedLoRALinear`` whose ``u`` this layer uses (q, k and v of a layer);
    - ``b_rows=(start, stop)``: the rows of a grouped ``shared.B`` this layer reads;
    - ``dropout``: dropout on the adapter's input in training mode (PEFT's ``lora_dropout``; default 0), on
      either backend (the fused kernels draw it themselves: ``kernels/dropout.py``).

    ``from_linear`` also adapts bitsandbytes' quantized linears (``quantized_linear_types``), as an instance of
    a subclass of both (``TiedLoRALinear4bit``, ...): the base runs the quantized layer's own forward, the
    adapter is added on the torch path (the fused kernels read a plain weight), and state-dict keys stay the
    quantized layer's. Such layers cannot merge: ΔW would be rounded into the quantized weight.
    """

    quantized = False
    """Whether the base is a quantized layer (a class made by ``from_linear``)."""
    fan_in_fan_out = False
    """Whether ``weight`` is stored ``[in, out]`` (``TiedLoRAConv1D``) rather than ``nn.Linear``'s ``[out, in]``."""
    bias_apart = False
    """Whether ``bias`` is added after the rest, rounded apart (``TiedLoRAFalconLinear``), not in the GEMM."""
    _tied_weights_keys = {"shared.A": "shared.A", "shared.B": "shared.B", "lora_scale.u": "lora_scale.u"}
    """Read by transformers' ``save_pretrained`` (hence ``Trainer``'s checkpoints): the tensors that several
    layers share, stored once under one of their names instead of refused (safetensors stores no aliases).
    Loading such a file restores them through that name (``apply_tied_lora``'s load hook fills in the rest)."""
    base_class: type[nn.Module] = nn.Linear
    """The class of the adapted layer."""

    # the adapter's attributes (set by _init_adapter; annotated here for type checkers)
    shared: TiedLoRAShared
    b_rows: tuple[int, int] | None
    rank: int
    _alpha: float
    backend: str
    merged: bool
    disabled: bool
    lora_scale: UScale
    v_init: float
    lora_v: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        shared: TiedLoRAShared | None = None,
        rank: int | None = None,
        **adapter: Unpack[AdapterOptions],
    ):
        if isinstance(bias, numbers.Integral) and not isinstance(bias, bool) and bias not in (0, 1):
            # TiedLoRALinear(16, 8, 4): rank and shared are keywords (nn.Linear takes any truthy bias)
            raise TypeError(f"bias must be True or False, got {bias!r} (rank= and shared= are keyword arguments)")
        _check_adapter_keywords(adapter)
        check_features(in_features, out_features)  # (nn.Linear's own errors do not name the argument)
        if dtype is not None:
            check_float_dtype(dtype, "dtype")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_adapter(_pair(shared, rank, in_features, out_features, device, adapter), **adapter)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        shared: TiedLoRAShared | None = None,
        *,
        rank: int | None = None,
        **adapter: Unpack[AdapterOptions],
    ) -> TiedLoRALinear:
        """Adapt ``linear`` (an ``nn.Linear``, a transformers ``Conv1D``: a ``TiedLoRAConv1D``, a ``FalconLinear``: a
        ``TiedLoRAFalconLinear``, or a quantized linear) with the pair ``shared`` or, given ``rank``, a pair of its
        own: its ``weight`` and ``bias`` parameters are reused, not copied, and its forward and backward hooks carry
        over. Refused (TypeError or ValueError, naming why): a layer adapted already, other ``nn.Linear``
        subclasses, a weight computed by a parametrization or pruning, a layer accelerate offloads."""
        _check_adapter_keywords(adapter)
        if isinstance(linear, TiedLoRALinear):
            raise TypeError("this layer already has a Tied-LoRA adapter")
        if not isinstance(linear, nn.Linear) and type(linear) is not conv1d_type():
            raise TypeError(f"from_linear needs an nn.Linear or a transformers Conv1D, got {class_label(type(linear))}")
        check_linear_type(linear, "this linear")
        check_plain_weight(linear, "this linear")
        if hasattr(linear, "_hf_hook"):
            raise ValueError("this linear carries an accelerate hook (offloading): its weight loads only while it runs")
        # the class follows the base alone (TiedLoRAConv1D.from_linear(nn.Linear) would read W transposed)
        kind: type[TiedLoRALinear]
        if type(linear) is nn.Linear:
            kind = TiedLoRALinear
        elif type(linear) is falcon_linear_type():
            kind = TiedLoRAFalconLinear
        else:
            kind = TiedLoRAConv1D if type(linear) is conv1d_type() else _quantized_class(type(linear))
        if cls is not TiedLoRALinear and cls is not kind:
            raise TypeError(f"{cls.__name__}.from_linear got a {type(linear).__name__}: use TiedLoRALinear.from_linear")
        layer = kind.__new__(kind)
        nn.Module.__init__(layer)
        if kind.quantized:
            _copy_state(linear, layer)
        layer.in_features, layer.out_features = linear_features(linear)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.training = linear.training
        if getattr(linear, "_is_hf_initialized", False):  # transformers' mark: init_weights() leaves it alone
            layer._is_hf_initialized = True  # type: ignore[assignment]  # (torch types attributes Tensor | Module)
        pair = _pair(shared, rank, layer.in_features, layer.out_features, linear.weight.device, adapter)
        layer._init_adapter(pair, **adapter)  # its checks before anything of linear's moves
        weight: Any = layer.weight
        if getattr(weight, "module", None) is linear:  # bitsandbytes' Params4bit finds its layer there
            weight.module = layer
        carry_hooks(linear, layer)
        return layer

    def _init_adapter(
        self,
        shared: TiedLoRAShared,
        *,
        alpha: float | None = None,
        train_u: bool = True,
        train_v: bool = True,
        u_init: float = 1.0,
        v_init: float | None = None,
        share_u_with: TiedLoRALinear | None = None,
        b_rows: tuple[int, int] | None = None,
        backend: str = "auto",
        dropout: float = 0.0,
    ) -> None:
        if not isinstance(shared, TiedLoRAShared):
            raise TypeError(f"shared must be a TiedLoRAShared, got {type(shared).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_backend_rank(backend, shared.rank)
        check_dropout(dropout)
        if self.quantized and backend == "triton":
            raise ValueError(
                f"backend='triton' needs a plain weight; this layer's base is a quantized {self.base_class.__name__}, "
                "which runs its own forward with the adapter on the torch path: use backend='auto' or 'torch'"
            )
        alpha = _checked_alpha(shared.rank if alpha is None else alpha, shared.rank)
        if not isinstance(train_v, bool):
            raise TypeError(f"train_v must be True or False, got {train_v!r}")
        v_init = _v_start(v_init, train_v)
        if isinstance(v_init, bool) or not isinstance(v_init, numbers.Real) or not is_finite(v_init):
            raise ValueError(f"v_init must be a finite number or None, got {shown(v_init)}")
        if shared.in_features != self.in_features:
            raise ValueError(
                f"shared A is [{shared.rank}, {shared.in_features}] but the layer has in_features={self.in_features}"
            )
        if b_rows is not None and (
            not isinstance(b_rows, (tuple, list))
            or len(b_rows) != 2
            or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in b_rows)
        ):
            raise TypeError(f"b_rows must be a (start, stop) pair of ints or None, got {b_rows!r}")
        start, stop = (int(b_rows[0]), int(b_rows[1])) if b_rows is not None else (0, shared.out_features)
        if not (0 <= start < stop <= shared.out_features) or stop - start != self.out_features:
            raise ValueError(
                f"the layer has out_features={self.out_features} but reads rows [{start}, {stop}) of shared B "
                f"[{shared.out_features}, {shared.rank}]"
            )
        self.shared = shared
        self.b_rows = None if (start, stop) == (0, shared.out_features) else (start, stop)
        self.rank, self._alpha = shared.rank, alpha
        self.backend = backend
        self.lora_dropout = float(dropout)
        self.merged = False
        self.disabled = False  # True: forward is the base linear alone (model.disable_tied_lora)
        factory = {"device": shared.A.device, "dtype": shared.A.dtype}

        if share_u_with is not None:
            if not isinstance(share_u_with, TiedLoRALinear) or share_u_with.rank != shared.rank:
                raise ValueError("share_u_with must be a TiedLoRALinear of the same rank")
            lora_scale = share_u_with.lora_scale
            if (lora_scale.u is not None and lora_scale.u.requires_grad) != train_u:
                raise ValueError(
                    f"the u of share_u_with {'trains' if not train_u else 'is frozen'}, but train_u={train_u}"
                )
            if lora_scale.init != u_init:
                raise ValueError(f"the u of share_u_with starts at {lora_scale.init:g}, but u_init={u_init!r}")
        else:
            lora_scale = UScale(shared.rank, train=train_u, init=u_init, **factory)
        self.lora_scale = lora_scale
        self.v_init = float(v_init)
        if train_v or v_init != 1.0:
            self.lora_v = nn.Parameter(torch.empty(self.out_features, **factory), requires_grad=train_v)
        else:
            self.register_parameter("lora_v", None)
        self.reset_adapter()
        _warn_if_it_cannot_train(shared, lora_scale, train_v, self.v_init)

    @property
    def lora_u(self) -> Tensor | None:
        """``u [rank]`` (shared with the other projections of a group), ``None`` when frozen at one."""
        return self.lora_scale.u

    @property
    def lora_B(self) -> Tensor:
        """This layer's rows of the shared ``B`` (a view: gradients reach the shared parameter)."""
        return _own_rows(self.shared.B, self.b_rows)

    def _factors(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(shared.A, lora_B, lora_u, lora_v)`` with ``shared`` read once: each submodule or parameter attribute
        goes through ``nn.Module.__getattr__`` (~0.5 µs), and forward runs at every decode step."""
        shared = self.shared
        return shared.A, _own_rows(shared.B, self.b_rows), self.lora_scale.u, self.lora_v

    def reset_parameters(self) -> None:
        """``nn.Linear``'s reset of ``weight``/``bias`` (not of a quantized one), then the adapter's (for
        meta-device init flows): its shared pair is redrawn for every layer that shares it."""
        if not self.quantized:
            super().reset_parameters()
        if "lora_scale" in self._modules:  # nn.Linear.__init__ calls this before the adapter exists
            self.shared.reset_parameters()
            self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """Put ``u`` and ``v`` back at their start values (``u`` for every layer of the group that shares it;
        ``shared`` has its own ``reset_parameters``)."""
        self.lora_scale.reset_parameters()
        if self.lora_v is not None and not self.lora_v.is_meta:
            self.lora_v.fill_(self.v_init)

    @property
    def alpha(self) -> float:
        """``scale = alpha / rank``; set it to change the scale (checked as the constructor checks it, None: the
        rank; not while merged, ``weight`` holding ΔW at the old one): forward, merging, saving and exporting then
        use the new one."""
        return self._alpha

    @alpha.setter
    def alpha(self, alpha: float | None) -> None:
        alpha = _checked_alpha(self.rank if alpha is None else alpha, self.rank)
        if self.merged and alpha != self._alpha:
            raise RuntimeError("this TiedLoRALinear is merged (weight holds ΔW at its alpha): unmerge() it first")
        self._alpha = alpha

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor of the adapter term (read-only: set ``alpha``)."""
        return self._alpha / self.rank

    @scale.setter
    def scale(self, scale: float) -> None:
        raise AttributeError(f"scale is alpha / rank: set alpha instead (layer.alpha = scale * {self.rank})")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "dropout" and value is not None and not isinstance(value, nn.Module):
            # (the constructor's keyword; the attribute is the nn.Dropout child, made when a non-zero p is set)
            raise TypeError(f"set the adapter's dropout probability with layer.lora_dropout = {value!r}")
        super().__setattr__(name, value)

    def __setstate__(self, state: dict) -> None:
        p = state.pop("lora_dropout", None)  # (a float in layers pickled before it became an nn.Dropout child's p)
        if "alpha" in state:  # (layers pickled before alpha became a property, scale computed from it): the scale
            # they ran with, which a scale set by hand made other than alpha / rank
            alpha = state.pop("alpha")
            scale = state.pop("scale", alpha / state["rank"])
            state["_alpha"] = alpha if scale == alpha / state["rank"] else scale * state["rank"]
        super().__setstate__(state)
        if p:
            self.lora_dropout = p

    @property
    def lora_dropout(self) -> float:
        """The adapter's dropout probability: ``p`` of an ``nn.Dropout`` child ``dropout`` (absent until a non-zero
        ``p`` is set, then kept, also at 0; the kernels read it and draw the mask themselves), so that what sets
        every ``nn.Dropout``'s ``p`` to 0 reaches it, as it reaches PEFT's ``lora_dropout`` (TRL's
        ``disable_dropout``, on by default for DPO)."""
        module = self._modules.get("dropout")
        return module.p if isinstance(module, nn.Dropout) else 0.0

    @lora_dropout.setter
    def lora_dropout(self, p: float) -> None:
        check_dropout(p)
        module = self._modules.get("dropout")
        if isinstance(module, nn.Dropout):
            module.p = float(p)
        elif p:
            self.dropout = nn.Dropout(float(p))

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disabled:
            if self.merged and self.disabled:
                raise RuntimeError("this TiedLoRALinear is disabled but merged (weight holds ΔW): unmerge() it first")
            if self.merged and self.training and torch.is_grad_enabled() and not _tracing():
                self._warn_if_adapter_trains()
            return self._base_forward(x)
        dropout = self.lora_dropout if self.training else 0.0
        A, B, u, v = self._factors()
        if self.quantized:
            return add_adapter(self._base_forward(x), x, A, B, u, v, self.scale, dropout=dropout)
        y = tied_lora_linear(
            x,
            self.weight.t() if self.fan_in_fan_out else self.weight,
            None if self.bias_apart else self.bias,
            A,
            B,
            u,
            v,
            self.scale,
            backend=self.backend,
            dropout=dropout,
        )
        return y + self.bias if self.bias_apart and self.bias is not None else y

    def _warn_if_adapter_trains(self) -> None:
        # a training step on merged layers trains nothing of the adapter: with nothing else trained, backward fails
        # with PyTorch's "does not require grad"; with a trained head beside it, training goes on without it
        if any(t is not None and t.requires_grad for t in self._factors()):
            warnings.warn(
                "a merged TiedLoRALinear runs in training mode with gradients enabled, and its adapter's factors, "
                "which its weight now holds as ΔW, get no gradient from it: unmerge_tied_lora(model) (or layer."
                "unmerge()) before training, model.eval() or torch.no_grad() to evaluate merged",
                stacklevel=2,
            )

    def _base_forward(self, x: Tensor) -> Tensor:
        return super().forward(x)  # nn.Linear's, or the quantized layer's own

    def to_base(self) -> nn.Module:
        """The layer without its adapter (``weight`` as it is now: merged or not): an ``nn.Linear``, a ``Conv1D``
        or the quantized layer, holding the same parameters (and quantisation state), with this layer's forward
        and backward hooks moved over."""
        self._check_weight_stored("unload it")
        base: Any  # (an nn.Linear, a Conv1D or a quantized layer, whose weight may carry bitsandbytes' .module)
        if self.quantized:  # the quantized layer's own state back, less the adapter's
            base = self.base_class.__new__(self.base_class)
            nn.Module.__init__(base)
            _copy_state(self, base, skip=_ADAPTER_ATTRIBUTES)
        elif self.fan_in_fan_out:  # GPT-2's Conv1D (its init's allocations on the meta device)
            conv1d = conv1d_type()
            assert conv1d is not None  # (a TiedLoRAConv1D exists once transformers has loaded Conv1D)
            with torch.device("meta"):
                base = conv1d(self.out_features, self.in_features)
        elif self.bias_apart:  # Falcon's FalconLinear (an unpickled layer may come before transformers' import)
            falcon = importlib.import_module("transformers.models.falcon.modeling_falcon").FalconLinear
            base = falcon(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        else:
            base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        base.weight, base.bias = self.weight, self.bias
        if getattr(base.weight, "module", None) is self:  # bitsandbytes' Params4bit finds its layer there
            base.weight.module = base
        base.training = self.training
        if getattr(self, "_is_hf_initialized", False):  # (as from_linear carried it over)
            base._is_hf_initialized = True
        carry_hooks(self, base)
        return base

    def delta_weight(self) -> Tensor:
        """``ΔW = scale · diag(v) · B · diag(u) · A``, ``[out, in]`` (also for a ``Conv1D``), in the adapter's
        dtype."""
        return reference.delta_weight(self.shared.A, self.lora_B, self.lora_u, self.lora_v, self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into ``weight`` (computed in float32, or float64 for a float64 weight, and rounded once);
        forward then costs a plain linear. Keeps a copy of the factors merged (``r·(in + out) + r + out`` values)
        until ``unmerge``. Refused (RuntimeError): merged already, disabled, a quantized or computed weight."""
        self._merge(None)

    def _merge(self, copies: dict[int, tuple[Tensor, Tensor]] | None) -> None:
        # keeps a copy of the factors merged: unmerge takes out this ΔW, also after the adapter changed (a tied pair
        # trained through other layers, reset_adapter()). Alone: this layer's (r·(in + out) + r + out values);
        # merge_tied_lora passes one dict of copies to all its layers, so a tensor they share (a tied A, B, a
        # group's u) is copied once, not once per layer (11x the adapter at LLaMA-2-7B, all-linear, r = 8)
        if self.merged:
            raise RuntimeError("this TiedLoRALinear is already merged; unmerge() it first")
        self.check_mergeable()
        if copies is None:
            factors = tuple(None if t is None else t.detach().clone() for t in self._factors())
        else:
            shared, u, v = self.shared, self.lora_scale.u, self.lora_v
            B = _own_rows(_copy(shared.B, copies), self.b_rows)
            factors = (
                _copy(shared.A, copies),
                B,
                None if u is None else _copy(u, copies),
                None if v is None else v.detach().clone(),
            )
        self._add_delta(+1.0, factors)
        self._merged_factors = factors
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the ΔW that ``merge`` added back out of ``weight``: exact up to the rounding of ``weight``'s dtype,
        whatever the adapter's factors became since; except after a ``load_state_dict`` that loaded ``weight``,
        which is then taken to hold the ΔW of the factors as they are now."""
        if not self.merged:
            raise RuntimeError("this TiedLoRALinear is not merged")
        self._check_weight_stored("unmerge")
        self._add_delta(-1.0, self.__dict__.pop("_merged_factors", None) or self._factors())
        self.merged = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a merged weight loaded in holds the ΔW of the loaded factors, not of those merge() kept; any other load
        # (the adapter's factors alone, a key of another module) leaves the weight as merge() made it
        if prefix + "weight" in state_dict:
            self.__dict__.pop("_merged_factors", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_mergeable(self) -> None:
        """Raise unless ΔW can go into ``weight``: not while disabled (``disable_tied_lora`` promises the base
        model), not into a quantized weight, where it would be rounded away, nor into a computed one."""
        if self.disabled:
            raise RuntimeError("this TiedLoRALinear is disabled (disable_tied_lora): merge it outside that block")
        self._check_weight_stored("merge")
        if self.quantized:
            raise RuntimeError(
                f"cannot merge into a quantized {self.base_class.__name__} weight (ΔW would be rounded into it): "
                "keep the adapter separate, export it with export_peft_lora, or merge into a dequantized copy of "
                "the base model"
            )

    def _check_weight_stored(self, what: str) -> None:
        # a parametrization or a forward pre-hook (pruning, weight norm) computes `weight` from other tensors:
        # ΔW written into it would be lost at the next forward, and it is no parameter to hand back
        if "weight" not in self._parameters:
            raise RuntimeError(
                "this TiedLoRALinear's weight is computed (by a parametrization, or a forward pre-hook: pruning, "
                f"weight or spectral norm): remove that before you {what} "
                "(torch.nn.utils.parametrize.remove_parametrizations, torch.nn.utils.prune.remove)"
            )

    def _add_delta(self, sign: float, factors: tuple) -> None:
        # weight ± ΔW of factors (A, B, u, v) in at least float32, rounded once to weight's dtype
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        A, B, u, v = (None if t is None else t.to(self.weight.device) for t in factors)  # (moved since: .to())
        assert A is not None and B is not None
        delta = reference.delta_weight(A, B, u, v, sign * self.scale, dtype=dtype)
        self.weight.copy_(self.weight.to(dtype) + (delta.t() if self.fan_in_fan_out else delta))

    def extra_repr(self) -> str:
        factors = (("A", self.shared.A), ("B", self.shared.B), ("u", self.lora_u), ("v", self.lora_v))
        trained = [n for n, p in factors if p is not None and p.requires_grad]
        rows = "" if self.b_rows is None else f", b_rows={self.b_rows}"
        return (
            f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, "
            f"trains={'+'.join(trained) or 'nothing'}{rows}, backend={self.backend}, merged={self.merged}"
            + (f", dropout={self.lora_dropout:g}" if self.lora_dropout else "")
            + (", disabled=True" if self.disabled else "")
        )


def _tracing() -> bool:
    """Whether torch.compile (or torch.export), torch.jit.trace or torch.fx traces the call: a warning breaks the
    first's graph, and torch.fx cannot test a traced parameter's ``requires_grad``."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or _fx_symbolic_tracing()


_fx_symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None) or (
    lambda: torch.fx._symbolic_trace._is_fx_tracing_flag
)
"""torch.fx's own test for ``symbolic_trace`` (``is_fx_tracing``, which also covers torch.export, logs a warning to
use this one at its first call)."""


def _copy_state(src: nn.Module, dst: nn.Module, skip: frozenset = frozenset()) -> None:
    """A quantized layer's own state (compute dtype, quantisation state, state-dict hooks, buffers) from ``src``
    onto the freshly made ``dst``; not its parameters, submodules and forward/backward hooks (the caller's), nor
    what is bound to ``src`` itself: an instance-level forward (a patch) or ``module.compile()``'s call."""
    own = {"_parameters", "_buffers", "_non_persistent_buffers_set", "_modules", *MODULE_HOOKS, *skip}
    dst.__dict__.update({k: v for k, v in vars(src).items() if k not in own and not callable(v)})
    for name, buffer in src._buffers.items():
        dst.register_buffer(name, buffer, persistent=name not in src._non_persistent_buffers_set)


_ADAPTER_ATTRIBUTES = frozenset(
    {"shared", "lora_scale", "lora_v", "b_rows", "rank", "_alpha", "backend", "dropout", "lora_dropout", "merged",
     "disabled", "v_init", "_merged_factors"}
)  # fmt: skip
"""What ``_init_adapter`` adds to a layer (``to_base`` leaves it behind)."""


def _checked_alpha(alpha: float, rank: int) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a number or None, got {alpha!r}")
    if not is_finite(alpha) or alpha <= 0 or alpha / rank > torch.finfo(torch.float32).max:
        raise ValueError(f"alpha must be a positive finite number (alpha / rank within float32), got {shown(alpha)}")
    return float(alpha)


def _copy(t: Tensor, copies: dict[int, tuple[Tensor, Tensor]]) -> Tensor:
    """A copy of ``t``, made once per ``copies``, which holds ``t`` too: a factor computed at each access (a
    parametrization) is a new tensor each time, and one freed could hand its id to the next."""
    if id(t) not in copies:
        copies[id(t)] = (t, t.detach().clone())
    return copies[id(t)][1]


def _own_rows(B: Tensor, b_rows: tuple[int, int] | None) -> Tensor:
    """The rows ``b_rows`` of a shared ``B`` (a view), all of them for None."""
    return B if b_rows is None else B[b_rows[0] : b_rows[1]]


def _v_start(v_init: float | None, train_v: bool) -> float:
    """``v``'s start value: ``v_init``, or by default 0 for a trained ``v`` (the zero start) and 1 for a frozen one
    (then not stored)."""
    return (0.0 if train_v else 1.0) if v_init is None else v_init


def _pair(
    shared: TiedLoRAShared | None, rank: int | None, in_features: int, out_features: int, device, adapter: Mapping
) -> TiedLoRAShared:
    """``shared``, or a new pair of ``rank`` for one layer: exactly one of them is given. A new pair keeps the zero
    start: ``B`` starts at zero when neither of the layer's ``u`` and ``v`` does (a frozen ``v``, at one by
    default)."""
    if shared is not None and rank is None:
        return shared
    if shared is None and rank is not None:
        v_zero = _v_start(adapter.get("v_init"), adapter.get("train_v", True)) == 0
        u_zero = adapter.get("u_init", 1.0) == 0
        return TiedLoRAShared(in_features, out_features, rank, zero_B=not (v_zero or u_zero), device=device)
    given = "not both: got shared= and rank=" if shared is not None else "got neither"
    raise TypeError(f"give the layer shared= (a pair tied with other layers) or rank= (a pair of its own), {given}")


class TiedLoRAConv1D(TiedLoRALinear):
    """A transformers ``Conv1D`` (GPT-2's linear: ``y = x·W + b`` with ``weight`` stored ``[in, out]``) with a
    Tied-LoRA adapter, made by ``TiedLoRALinear.from_linear(conv1d, shared)``. It keeps the ``Conv1D``'s
    ``weight`` and ``bias`` (same parameters, same keys and shapes) and its ``nf``/``nx``; the adapter, the
    kernels (which read ``weight`` through a transposed view, no copy) and ``delta_weight`` use ``nn.Linear``'s
    ``[out, in]`` convention. Merged or disabled, forward is the ``Conv1D``'s own computation."""

    fan_in_fan_out = True

    def __init__(self, *args, **kwargs):
        raise TypeError("a TiedLoRAConv1D adapts an existing Conv1D: use TiedLoRALinear.from_linear(conv1d, shared)")

    @property
    def nf(self) -> int:
        return self.out_features

    @property
    def nx(self) -> int:
        return self.in_features

    def _base_forward(self, x: Tensor) -> Tensor:
        # exactly Conv1D.forward: bit for bit the layer before it was adapted
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)

    def reset_parameters(self) -> None:
        """``Conv1D``'s init of ``weight``/``bias`` (normal, std 0.02; zeros), then the adapter's."""
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)
        self.shared.reset_parameters()
        self.reset_adapter()


class TiedLoRAFalconLinear(TiedLoRALinear):
    """transformers' ``FalconLinear`` (``y = x Wᵀ``, then ``+ b``: the bias is added after the product is rounded,
    as Falcon was trained and as transformers keeps it) with a Tied-LoRA adapter, made by
    ``TiedLoRALinear.from_linear(falcon_linear, shared)``. The adapter term goes in with the product (either
    backend) and the bias after it, so a zero adapter computes the ``FalconLinear`` bit for bit on the torch path;
    merged or disabled, forward is the ``FalconLinear``'s own computation."""

    bias_apart = True

    def __init__(self, *args, **kwargs):
        raise TypeError(
            "a TiedLoRAFalconLinear adapts an existing FalconLinear: use TiedLoRALinear.from_linear(linear, shared)"
        )

    def _base_forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight.T  # exactly FalconLinear.forward
        return y if self.bias is None else y + self.bias
