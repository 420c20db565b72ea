"""Model-level helpers: adapt a model in place, merge/unmerge, count, and save/load the tiny adapter.

``apply_tied_lora`` replaces every targeted ``nn.Linear`` by a ``TiedLoRALinear`` and creates one
``TiedLoRAShared`` per tie group and shape (per layer instead when ``tie`` is off). The adapter on disk is a
safetensors file (each shared ``A``/``B`` stored once) and a JSON file with the config and the layout.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch
from torch import nn

from tied_lora_kernels.config import TiedLoRAConfig
from tied_lora_kernels.layer import TiedLoRALinear
from tied_lora_kernels.shared import TiedLoRAShared

__all__ = [
    "apply_tied_lora",
    "merge_tied_lora",
    "unmerge_tied_lora",
    "tied_lora_state_dict",
    "save_tied_lora",
    "load_tied_lora",
    "count_parameters",
    "ParameterCount",
    "tied_lora_layers",
]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "tied_lora_kernels/1"


class ParameterCount(NamedTuple):
    trainable: int
    total: int


def tied_lora_layers(model: nn.Module) -> dict[str, TiedLoRALinear]:
    """Every ``TiedLoRALinear`` in ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TiedLoRALinear)}


def apply_tied_lora(model: nn.Module, config: TiedLoRAConfig) -> nn.Module:
    """Adapt ``model`` in place and return it: targeted ``nn.Linear`` layers become ``TiedLoRALinear``,
    the base model is frozen, and only the adapter parameters the config trains require grad."""
    if not isinstance(config, TiedLoRAConfig):
        raise TypeError(f"config must be a TiedLoRAConfig, got {type(config).__name__}")
    if tied_lora_layers(model):
        raise RuntimeError("this model already has Tied-LoRA adapters")
    targets = _find_targets(model, config)
    r = config.resolved
    for p in model.parameters():
        p.requires_grad_(False)

    shared_by_key: dict[tuple, TiedLoRAShared] = {}
    for key, members in _group_instances(targets, config).items():
        linears = [targets[name] for name in members]
        in_features = {lin.in_features for lin in linears}
        if len(in_features) > 1:
            raise ValueError(f"grouped layers {members} must share in_features, got {sorted(in_features)}")
        out_total = sum(lin.out_features for lin in linears)
        device = linears[0].weight.device
        tie_key = (key[1], in_features.pop(), out_total) if r["tie"] else key
        shared = shared_by_key.get(tie_key)
        if shared is None:
            shared = shared_by_key[tie_key] = TiedLoRAShared(
                linears[0].in_features,
                out_total,
                config.rank,
                train_A=r["train_A"],
                train_B=r["train_B"],
                init=r["init"],
                zero_A=r["zero_A"],
                zero_B=r["zero_B"],
                seed=config.seed + len(shared_by_key),
                device=device,
                dtype=config.dtype,
            )
        elif shared.A.device != device:
            raise ValueError(f"tied layers live on several devices ({shared.A.device} and {device}): {members}")
        u = None
        if r["train_u"] or r["u_init"] != 1.0:
            u = nn.Parameter(
                torch.full((config.rank,), r["u_init"], device=device, dtype=config.dtype),
                requires_grad=r["train_u"],
            )
        start = 0
        for name, lin in zip(members, linears, strict=True):
            stop = start + lin.out_features
            layer = TiedLoRALinear.from_linear(
                lin,
                shared,
                alpha=config.alpha,
                train_u=r["train_u"],
                train_v=r["train_v"],
                u_init=r["u_init"],
                v_init=r["v_init"],
                u=u,
                b_rows=(start, stop),
                backend=config.backend,
            )
            _set_submodule(model, name, layer)
            start = stop
    model.tied_lora_config = config
    return model


def _find_targets(model: nn.Module, config: TiedLoRAConfig) -> dict[str, nn.Linear]:
    targets = {}
    for name, module in model.named_modules():
        if callable(config.target_modules):
            hit = bool(config.target_modules(module, name))
        else:
            hit = any(name == t or name.endswith("." + t) for t in config.target_modules)
        if not hit:
            continue
        if type(module) is not nn.Linear:
            raise TypeError(f"target {name!r} is a {type(module).__name__}; only nn.Linear layers can be adapted")
        targets[name] = module
    if not targets:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"target_modules={config.to_dict()['target_modules']} matched no nn.Linear in the model; "
            f"its linear layers include {linears[:8]}"
        )
    return targets


def _group_instances(targets: dict[str, nn.Linear], config: TiedLoRAConfig) -> dict[tuple, list[str]]:
    """``(parent, label) -> member names``: grouped targets of one parent together, in group order."""
    role_group = {role: i for i, g in enumerate(config.groups) for role in g}
    instances: dict[tuple, list[str]] = {}
    for name in targets:
        parent, _, role = name.rpartition(".")
        if role in role_group:
            key = (parent, "group:" + "+".join(config.groups[role_group[role]]))
        else:
            key = (name, role)
        instances.setdefault(key, []).append(name)
    for key, members in instances.items():
        if key[1].startswith("group:"):
            order = {role: i for i, role in enumerate(config.groups[role_group[members[0].rpartition(".")[2]]])}
            members.sort(key=lambda n: order[n.rpartition(".")[2]])
    return instances


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _require_layers(model: nn.Module) -> dict[str, TiedLoRALinear]:
    layers = tied_lora_layers(model)
    if not layers:
        raise ValueError("this model has no Tied-LoRA adapters (apply_tied_lora first)")
    return layers


def merge_tied_lora(model: nn.Module, *, unload: bool = False) -> nn.Module:
    """Fold every adapter into its base weight. ``unload=True`` then puts plain ``nn.Linear`` layers
    (sharing the merged weights) back in place, for export; otherwise ``unmerge_tied_lora`` undoes it."""
    layers = _require_layers(model)
    for layer in layers.values():
        layer.merge()
    if unload:
        for name, layer in layers.items():
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            plain.weight, plain.bias = layer.weight, layer.bias
            _set_submodule(model, name, plain)
        del model.tied_lora_config
    return model


def unmerge_tied_lora(model: nn.Module) -> nn.Module:
    """Take every adapter back out of its base weight."""
    for layer in _require_layers(model).values():
        layer.unmerge()
    return model


def _factors(layer: TiedLoRALinear) -> tuple:
    return layer.shared.A, layer.shared.B, layer.lora_u, layer.lora_v


def _adapter_params(layers: dict[str, TiedLoRALinear]) -> set[int]:
    return {id(p) for layer in layers.values() for p in _factors(layer) if p is not None}


def tied_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor once (tied ones under the first name PyTorch gives them), detached."""
    ids = _adapter_params(_require_layers(model))
    return {name: p.detach() for name, p in model.named_parameters() if id(p) in ids}


def _layout(model: nn.Module) -> dict[str, dict]:
    """What an adapter file must match: each adapted layer's shapes and where its shared pair lives."""
    layers = tied_lora_layers(model)
    shared_names = {}
    for name, p in model.named_parameters():
        shared_names.setdefault(id(p), name.rpartition(".")[0])
    return {
        name: {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "rank": layer.rank,
            "alpha": layer.alpha,
            "trains": [k for k, p in zip("ABuv", _factors(layer), strict=True) if p is not None and p.requires_grad],
            "shared": shared_names[id(layer.shared.A)],
            "b_rows": list(layer.b_rows) if layer.b_rows else None,
        }
        for name, layer in layers.items()
    }


def save_tied_lora(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``adapter_model.safetensors`` (each tensor once) and ``adapter_config.json`` to ``directory``."""
    from safetensors.torch import save_file

    state = {k: v.contiguous().cpu() for k, v in tied_lora_state_dict(model).items()}
    config = getattr(model, "tied_lora_config", None)
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {
        "format": FORMAT,
        "config": config.to_dict() if config is not None else None,
        "layout": _layout(model),
    }
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)


def load_tied_lora(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by ``save_tied_lora``. A model without adapters is adapted first with the saved
    config; an adapted one must have the same layout. Any mismatch raises before a tensor is copied."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_NAME)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory} is not a tied_lora_kernels adapter (format {meta.get('format')!r})")
    layout = meta["layout"]
    if not tied_lora_layers(model):
        if meta["config"] is None:
            raise ValueError("the adapter was saved without a config: adapt the model first, then load")
        _check_base_shapes(model, layout)
        fields = dict(meta["config"], target_modules=tuple(layout))
        apply_tied_lora(model, TiedLoRAConfig(**fields))
    ours = _layout(model)
    if ours != layout:
        diff = _describe_diff(ours, layout)
        raise ValueError(f"the adapter in {directory} does not fit this model: {diff}")

    state = load_file(os.path.join(directory, WEIGHTS_NAME))
    params = dict(model.named_parameters())
    expected = tied_lora_state_dict(model)
    if set(state) != set(expected):
        raise ValueError(
            f"adapter tensors differ: missing {sorted(set(expected) - set(state))}, "
            f"unexpected {sorted(set(state) - set(expected))}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{name}: saved shape {tuple(tensor.shape)}, model has {tuple(expected[name].shape)}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    return model


def _check_base_shapes(model: nn.Module, layout: dict[str, dict]) -> None:
    modules = dict(model.named_modules())
    for name, entry in layout.items():
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"the adapter targets {name!r}, which is not an nn.Linear in this model")
        if (m.in_features, m.out_features) != (entry["in_features"], entry["out_features"]):
            raise ValueError(
                f"{name}: the adapter was saved for [{entry['out_features']}, {entry['in_features']}], "
                f"this model's layer is [{m.out_features}, {m.in_features}]"
            )


def _describe_diff(ours: dict, theirs: dict) -> str:
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    if missing or extra:
        return f"layers only in the adapter {missing[:4]}, only in the model {extra[:4]}"
    name = next(n for n in ours if ours[n] != theirs[n])
    return f"layer {name!r}: model {ours[name]}, adapter {theirs[name]}"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameters, each tensor counted once however many layers share it."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return ParameterCount(trainable, total)
