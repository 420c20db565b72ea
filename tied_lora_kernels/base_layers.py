"""The base layers an adapter can wrap: which module types (``nn.Linear``, transformers' ``Conv1D`` and
``FalconLinear``, bitsandbytes' quantized linears: looked up once their library is loaded, never imported here),
their features and the checks on them, and moving a module's hooks to the module that replaces it."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODULE_HOOKS",
    "QUANTIZED_NAMES",
    "adaptable_types",
    "carry_hooks",
    "check_linear_type",
    "check_plain_weight",
    "class_label",
    "conv1d_type",
    "falcon_linear_type",
    "linear_features",
    "qualified_name",
    "quantized_linear_types",
]


MODULE_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
)
"""The attributes of ``nn.Module`` that hold its forward and backward hooks (``carry_hooks`` moves them)."""


def check_linear_type(linear: nn.Module, what: str) -> None:
    """Refuse a module other than ``nn.Linear``, transformers' ``Conv1D`` and ``FalconLinear`` and the quantized
    linears the adapter can run beside; another ``nn.Linear`` subclass's forward may not be a linear of its weight
    (``nn.MultiheadAttention``'s ``out_proj`` is not even called)."""
    if type(linear) not in adaptable_types():
        if torch.nn.utils.parametrize.is_parametrized(linear):  # (the class is ParametrizedLinear)
            parametrized: Any = linear.parametrizations  # (a ModuleDict by the parametrized tensors' names)
            raise TypeError(
                f"{what} has a parametrization of {', '.join(parametrized)} (weight norm, spectral norm, "
                "orthogonal, ...), which computes its weight from other tensors: remove it first "
                "(torch.nn.utils.parametrize.remove_parametrizations) to adapt the layer"
            )
        raise TypeError(
            f"{what} is a {class_label(type(linear))}; only nn.Linear layers, transformers' Conv1D (GPT-2) and "
            "FalconLinear, and bitsandbytes' Linear4bit / Linear8bitLt can be adapted"
        )


def adaptable_types() -> tuple[type[nn.Module], ...]:
    """The layer types an adapter can take: ``nn.Linear``, transformers' ``Conv1D`` and ``FalconLinear`` (once
    transformers has loaded them), bitsandbytes' quantized linears (once bitsandbytes has)."""
    types = (nn.Linear, conv1d_type(), falcon_linear_type(), *quantized_linear_types())
    return tuple(t for t in types if t is not None)


def class_label(cls: type) -> str:
    """A class's name for an error message: qualified with its module when the bare name is one of the classes
    that can be adapted (PEFT's LoRA layer is a ``Linear`` too)."""
    return qualified_name(cls) if cls.__name__ in ("Linear", "Conv1D", *QUANTIZED_NAMES) else cls.__name__


def qualified_name(cls: type) -> str:
    """``module.QualifiedName`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's linear, its weight stored ``[in, out]``) once transformers has loaded
    it (a model holding one has; this never imports transformers), else None."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d if isinstance(conv1d, type) else None


def falcon_linear_type() -> type | None:
    """transformers' ``FalconLinear`` (Falcon's linear: ``x Wᵀ``, then ``+ b``, rounded apart as Falcon was
    trained) once transformers has loaded it (a model holding one has; this never imports transformers), else
    None."""
    falcon = getattr(sys.modules.get("transformers.models.falcon.modeling_falcon"), "FalconLinear", None)
    return falcon if isinstance(falcon, type) else None


def linear_features(linear: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` (or subclass) or a ``Conv1D`` (its weight is stored
    ``[in, out]``; its ``nx`` attribute exists from transformers 4.45 on, ``nf`` in every version)."""
    if isinstance(linear, nn.Linear):
        return linear.in_features, linear.out_features
    weight: Any = linear.weight  # (nn.Module's attribute lookup is typed Tensor | Module)
    return weight.shape[0], weight.shape[1]


def check_plain_weight(linear: nn.Linear, what: str) -> None:
    """Refuse a linear whose ``weight`` a forward pre-hook rebuilds (pruning, old-style weight or spectral norm):
    the adapted layer would carry the hook but not the parameters it rebuilds the weight from."""
    if "weight" not in linear._parameters:
        raise ValueError(
            f"{what} computes its weight in a forward pre-hook (pruning or weight/spectral norm): remove that "
            "first (e.g. torch.nn.utils.prune.remove) so the weight is a plain parameter"
        )


QUANTIZED_NAMES = ("Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt")
"""The bitsandbytes linears an adapter can run beside, by class name (``TiedLoRA`` + the name is its adapted kind)."""


def quantized_linear_types() -> tuple[type, ...]:
    """The ``nn.Linear`` subclasses an adapter can run beside, on the torch path: bitsandbytes' ``Linear4bit``
    (QLoRA; with its ``LinearNF4``/``LinearFP4``) and ``Linear8bitLt``, once bitsandbytes is imported (a model
    holding such layers has imported it; this never imports it)."""
    bnb_nn = getattr(sys.modules.get("bitsandbytes"), "nn", None)
    return tuple(t for t in (getattr(bnb_nn, name, None) for name in QUANTIZED_NAMES) if isinstance(t, type))


def carry_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Move the forward and backward hooks registered on ``src`` to ``dst`` (the same dicts, so the handles that
    registered them still remove them; ``src`` gets empty ones), as a module that replaces ``src`` should."""
    for name in MODULE_HOOKS:
        if name in vars(src):
            hooks = getattr(src, name)
            setattr(dst, name, hooks)
            setattr(src, name, type(hooks)())
