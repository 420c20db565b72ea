"""Model-level helpers: adapt a model in place, merge/unmerge/unload, disable, count.

``apply_tied_lora`` replaces every targeted ``nn.Linear`` by a ``TiedLoRALinear`` and creates one
``TiedLoRAShared`` per tie group and shape (a group: one role, the targets whose names differ only in their
numeric parts such as layer indices; per layer instead when ``tie`` is off). Which layers a config targets, and
the checks each must pass: ``targets.py``. Here too the checks on the model as a whole (a PEFT model, a sharded or
distributed one, parametrized factors, compiled parts) that saving, loading and the Trainer callbacks share.
Saving and loading the adapter: ``save_load.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from tied_lora_kernels.base_layers import carry_hooks, linear_features, qualified_name
from tied_lora_kernels.config import TiedLoRAConfig
from tied_lora_kernels.functional import first_names
from tied_lora_kernels.layer import TiedLoRALinear
from tied_lora_kernels.shared import TiedLoRAShared
from tied_lora_kernels.targets import (
    _find_targets,
    _names_of_parameters,
    _plan,
    _saved_modules,
    _shape,
    _warn_unmatched_names,
)

__all__ = [
    "apply_tied_lora",
    "merge_tied_lora",
    "unmerge_tied_lora",
    "unload_tied_lora",
    "disable_tied_lora",
    "count_parameters",
    "ParameterCount",
    "tied_lora_layers",
]


_MOVED = ("save_tied_lora", "load_tied_lora", "tied_lora_state_dict", "WEIGHTS_NAME", "CONFIG_NAME", "FORMAT")


def __getattr__(name: str):
    """Saving and loading moved to ``save_load.py``: their names still import from here."""
    if name in _MOVED:
        from tied_lora_kernels import save_load

        return getattr(save_load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ParameterCount(NamedTuple):
    trainable: int
    total: int


def _reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether a module of ``model`` runs transformers' activation checkpointing of the reentrant kind (or of a kind
    not recorded, counted as reentrant)."""
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            kwargs = getattr(getattr(m, "_gradient_checkpointing_func", None), "keywords", None) or {}
            if kwargs.get("use_reentrant", True):
                return True
    return False


def tied_lora_layers(model: nn.Module) -> dict[str, TiedLoRALinear]:
    """Every ``TiedLoRALinear`` in ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TiedLoRALinear)}


def apply_tied_lora(model: nn.Module, config: TiedLoRAConfig) -> nn.Module:
    """Adapt ``model`` in place and return it: targeted ``nn.Linear`` layers become ``TiedLoRALinear``,
    the base model is frozen, and only the adapter parameters the config trains and its ``modules_to_save``
    (trained in full) require grad. Also sets ``model.tied_lora_config``, registers a ``load_state_dict`` pre-hook
    (a state dict may hold a shared tensor under one of its names: ``_fill_tied_aliases``) and, on a Hugging Face
    model with reentrant gradient checkpointing on, calls ``enable_input_require_grads()`` (as PEFT does).

    Every check runs first, so a refused call leaves the model as it was: a model adapted already
    (RuntimeError); a PEFT model, a model inside ``DistributedDataParallel`` or with sharded (DTensor) parameters,
    a config that matches no module, a target whose weight is tied to another module's or that accelerate
    offloads, layers on several devices sharing a pair (ValueError, naming the layers); names of a list that
    match no module are warned about."""
    if isinstance(model, nn.Module) and isinstance(config, TiedLoRAConfig):  # (before: -W error leaves it as it was)
        _warn_unmatched_names(config, model)
    return _adapt(model, config)


def _adapt(model: nn.Module, config: TiedLoRAConfig, shared_of: dict[str, str] | None = None) -> nn.Module:
    """``apply_tied_lora``; ``shared_of`` (layer name -> its pair's name, an adapter file's layout) fixes which
    layers share a pair, instead of the config's rule (files keep loading if that rule changes)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, TiedLoRAConfig):
        raise TypeError(f"config must be a TiedLoRAConfig, got {type(config).__name__}")
    if tied_lora_layers(model):
        raise RuntimeError("this model already has Tied-LoRA adapters")
    _refuse_peft_model(model)
    _refuse_distributed(model)
    targets = _find_targets(model, config)
    saved = _saved_modules(model, config, targets)
    r = config.resolved
    # layers that are ModuleList elements (experts.0, experts.1, ...) are instances of one role; positions in a
    # Sequential are not
    listed = {name for name in targets if isinstance(model.get_submodule(name.rpartition(".")[0]), nn.ModuleList)}
    plan = _plan(targets, config, shared_of, listed)  # every check runs before the model is touched

    # a warning made an error (-W error) while layers are built leaves the model as it was, as a failed check does
    with _undone_on_error(model, targets):
        for p in model.parameters():
            p.requires_grad_(False)
        for module in saved.values():  # trained in full, saved with the adapter
            module.requires_grad_(True)
        shared_by_key: dict[tuple, TiedLoRAShared] = {}
        for tie_key, members in plan:
            linears = [targets[name] for name in members]
            shared = shared_by_key.get(tie_key)
            if shared is None:
                shared = shared_by_key[tie_key] = TiedLoRAShared(
                    *_shape(linears),
                    config.rank,
                    train_A=r["train_A"],
                    train_B=r["train_B"],
                    init=r["init"],
                    zero_A=r["zero_A"],
                    zero_B=r["zero_B"],
                    seed=config.seed + len(shared_by_key),
                    device=linears[0].weight.device,
                    dtype=config.dtype,
                )
            start, first = 0, None
            for name, lin in zip(members, linears, strict=True):
                stop = start + linear_features(lin)[1]
                layer = TiedLoRALinear.from_linear(
                    lin,
                    shared,
                    alpha=config.alpha,
                    train_u=r["train_u"],
                    train_v=r["train_v"],
                    u_init=r["u_init"],
                    v_init=r["v_init"],
                    share_u_with=first,
                    b_rows=(start, stop),
                    backend=config.backend,
                    dropout=config.dropout,
                )
                _set_submodule(model, name, layer)
                start, first = stop, first or layer
        # a copy: the config passed in may be changed and applied to another model afterwards (its fields may be set)
        model.tied_lora_config = dataclasses.replace(config)  # type: ignore[assignment]  # (torch: Tensor | Module)
        if not any(getattr(h, "hook", None) is _fill_tied_aliases for h in model._load_state_dict_pre_hooks.values()):
            model.register_load_state_dict_pre_hook(_fill_tied_aliases)
        enable_input_grads = getattr(model, "enable_input_require_grads", None)  # (a transformers PreTrainedModel's)
        hooked = _input_grads_hooked(model)
        if _reentrant_checkpointing(model) and callable(enable_input_grads) and not hooked:
            # as PEFT does when it wraps a checkpointing model: reentrant checkpointing gives no gradient to a layer
            # whose input does not require one, and transformers makes the input embeddings' output require it only
            # for models whose main input is input_ids (not Whisper's input_features, say)
            enable_input_grads()
    return model


_INPUT_GRAD_HOOKS = ("_require_grads_hooks", "_require_grads_hook")
"""Where ``enable_input_require_grads`` keeps its hook handles: a list from transformers 5 on (which also sets the
second to the list's one handle), one handle before."""


def _handles(value: Any) -> list:
    """The hook handles one of ``_INPUT_GRAD_HOOKS`` holds: a list, one handle, or none."""
    return [] if value is None else value if isinstance(value, list) else [value]


def _input_grads_hooked(model: nn.Module) -> bool:
    """Whether ``enable_input_require_grads`` has a hook registered on the model (transformers 4's
    ``disable_input_require_grads`` removes its handle but leaves it in place)."""
    return any(_registered(h) for name in _INPUT_GRAD_HOOKS for h in _handles(getattr(model, name, None)))


def _registered(handle: Any) -> bool:
    hooks = handle.hooks_dict_ref() if callable(getattr(handle, "hooks_dict_ref", None)) else None
    return hooks is not None and getattr(handle, "id", None) in hooks


@contextlib.contextmanager
def _undone_on_error(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Put a bare ``model`` back as it was if the block (``_adapt`` on the layers ``names``, then checks that need
    the adapted model) raises: its own modules (their hooks moved back), ``requires_grad`` flags, attributes and
    hooks."""
    originals = {name: model.get_submodule(name) for name in names}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    attributes = ("tied_lora_config", "_require_grads_hooks", "_require_grads_hook")
    before = {k: model.__dict__[k] for k in attributes if k in model.__dict__}
    load_hooks = set(model._load_state_dict_pre_hooks)
    try:
        yield
    except BaseException:
        for name, original in originals.items():
            layer = model.get_submodule(name)
            if layer is not original:
                carry_hooks(layer, original)
                if getattr(original.weight, "module", None) is layer:  # (bitsandbytes' Params4bit: from_linear)
                    original.weight.module = original  # type: ignore[union-attr]
                _set_submodule(model, name, original)
        for p, flag in flags:
            p.requires_grad_(flag)
        for name in _INPUT_GRAD_HOOKS:  # (enable_input_require_grads, by _adapt)
            handles = model.__dict__.get(name)
            if handles is not None and handles is not before.get(name):
                for handle in _handles(handles):
                    handle.remove()  # (transformers 5 sets both, the one handle among the list: twice is fine)
        for k in attributes:
            model.__dict__.pop(k, None)
        model.__dict__.update(before)
        for key in set(model._load_state_dict_pre_hooks) - load_hooks:
            del model._load_state_dict_pre_hooks[key]
        raise


def _peft_layer(model: nn.Module) -> tuple[str, str] | None:
    """``(name, class)`` of the first PEFT model or adapter layer in ``model`` (PEFT's ``PeftModel``,
    ``PeftMixedModel`` and ``BaseTunerLayer``, known once peft is imported; this never imports it), or None."""
    peft = sys.modules.get("peft")
    found = [getattr(peft, kind, None) for kind in ("PeftModel", "PeftMixedModel")]
    found.append(getattr(sys.modules.get("peft.tuners.tuners_utils"), "BaseTunerLayer", None))
    kinds = tuple(kind for kind in found if isinstance(kind, type))
    if kinds:
        for name, module in model.named_modules():
            if isinstance(module, kinds):
                return name, qualified_name(type(module))
    return None


def _refuse_peft_model(model: nn.Module) -> None:
    """Refuse a model to adapt that is, or holds, a PEFT model or adapter layer."""
    peft_layer = _peft_layer(model)
    if peft_layer is not None:
        name, cls = peft_layer
        raise ValueError(
            f"{f'{name!r}' if name else 'the model'} is a PEFT model or adapter layer ({cls}): Tied-LoRA adapts a "
            "bare base model. Take PEFT's adapter off first (merge_and_unload() or unload()), or bring a saved PEFT "
            "LoRA or VeRA adapter over with load_peft_adapter(base_model, path)"
        )


def _refuse_distributed(model: nn.Module) -> None:
    """Refuse to create adapter parameters in a model that is, or holds, a ``DistributedDataParallel`` (DDP took the
    parameters it averages when it was built, so new ones would train apart on each rank, silently: the ranks'
    adapters drift apart from the first step), or whose parameters are sharded (DTensors: ``fully_shard`` or tensor
    parallelism; the adapted layers' forward failed, mixing DTensors and plain tensors)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.parallel.DistributedDataParallel):
            raise ValueError(
                f"{f'{name!r} is' if name else 'the model is'} wrapped in DistributedDataParallel, which averages only "
                "the parameters it found when it was built: the adapter's new ones would train apart on each rank. "
                "Adapt (or load the adapter into) the bare model, then wrap it: DDP(apply_tied_lora(model, config))"
            )
    sharded = _sharded(model.named_parameters())
    if sharded:
        raise ValueError(
            f"{sharded[:3]} are sharded (DTensors: fully_shard or tensor parallelism): adapt (or load the adapter "
            "into) the model before sharding it"
        )


def _sharded(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the DTensors (FSDP2's or tensor parallelism's shards) among ``(name, tensor)`` pairs."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)  # (not imported if never used)
    return [name for name, t in named if dtensor is not None and isinstance(t, dtensor)]


def _refuse_peft_inside(model: nn.Module) -> None:
    """Refuse an adapted model with PEFT in it: PEFT freezes every parameter but its own, so the Tied-LoRA adapter
    would not train beside it, and its names (``base_model.model.``, ``base_layer``) would not fit the model
    without PEFT. A trainer given a ``peft_config`` (TRL's) wraps the model that way, silently."""
    found = _peft_layer(model)
    if found is not None:
        name, cls = found
        raise ValueError(
            f"this Tied-LoRA model has PEFT in it ({f'{name!r}: ' if name else ''}{cls}): PEFT freezes every "
            "parameter but its own, so the Tied-LoRA adapter would not train. A trainer given a peft_config (TRL's "
            "SFTTrainer, DPOTrainer, GRPOTrainer, ...) wraps the model with PEFT: pass none"
        )


def _fill_tied_aliases(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """``load_state_dict`` pre-hook of an adapted model: an adapter tensor that several layers share (``A``,
    ``B``, a group's ``u``) needs only one of its names in the state dict — ``save_pretrained``, hence
    ``Trainer``'s checkpoints, keeps one — and its other names are filled from it, so that strict loading
    passes. Names of one tensor that hold different values raise: they were different tensors when saved
    (another tie layout), and loading them all into one would silently keep the last."""
    for names in _names_of_parameters(module).values():
        names = [prefix + name for name in names if _is_adapter_tensor(name)]
        present = [name for name in names if name in state_dict]
        if len(names) < 2 or not present:
            continue
        first = state_dict[present[0]]
        clash = [name for name in present[1:] if not _same_values(state_dict[name], first)]
        if clash:
            raise RuntimeError(
                f"{present[0]} and {clash[0]} are one tied tensor in this model, but the state dict holds "
                "different values for them (saved from a model with other ties?): loading would keep only one"
            )
        for name in names:
            state_dict.setdefault(name, first)


def _same_values(a, b) -> bool:
    """Whether two state-dict entries hold the same values, NaN equal to NaN (a diverged run's tied tensor, saved
    under each of its names, is still one tensor)."""
    if a is b or not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.is_meta or b.is_meta:
        return True  # nothing to compare: loading reports what is wrong with them
    if a.shape != b.shape:
        return False
    b = b.to(a.device)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


_FACTOR_OF = {".shared.A": "A", ".shared.B": "B", ".lora_scale.u": "u", ".lora_v": "v"}
"""How the names of adapter tensors end (``TiedLoRAShared``'s pair, ``UScale``'s ``u``, a layer's ``v``), and the
factor each is; the other tensors of an adapter file are those of ``modules_to_save``."""


def _is_adapter_tensor(name: str) -> bool:
    return name.endswith(tuple(_FACTOR_OF))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _require_layers(model: nn.Module) -> dict[str, TiedLoRALinear]:
    layers = tied_lora_layers(model)
    if not layers:
        raise ValueError("this model has no Tied-LoRA adapters (apply_tied_lora first)")
    return layers


def merge_tied_lora(model: nn.Module, *, unload: bool = False) -> nn.Module:
    """Fold every adapter into its base weight. ``unload=True`` then puts the base layers (``nn.Linear``,
    ``Conv1D``, ``FalconLinear``; sharing the merged weights) back in place, for export (layers merged already are
    unloaded as they are); otherwise ``unmerge_tied_lora`` undoes it, and merging a merged layer again raises. All
    or none: every layer is checked first (merged already without ``unload``, disabled, a quantized or computed
    weight: RuntimeError naming the layer). Each tensor the layers share is copied once for their unmerge."""
    layers = _require_layers(model)
    for name, layer in layers.items():  # before touching any layer
        if layer.merged and not unload:
            raise RuntimeError(f"{name} is already merged: unmerge_tied_lora(model) first, or merge with unload=True")
        if layer.merged:
            _named(name, layer._check_weight_stored, "unload it")
        else:
            _named(name, layer.check_mergeable)
    copies: dict = {}  # (each tensor the layers share copied once for their unmerge)
    for layer in layers.values():
        if not (unload and layer.merged):
            with torch.no_grad():
                layer._merge(copies)
    if unload:
        _unload(model, layers)
    return model


def unload_tied_lora(model: nn.Module) -> nn.Module:
    """Take every adapter out without merging it (PEFT's ``unload()``): the ``nn.Linear``, ``Conv1D``,
    ``FalconLinear`` or bitsandbytes layers come back with their weights as they are, sharing them, hooks carried over;
    ``requires_grad`` flags stay as they are (the base frozen, ``modules_to_save`` trainable). Merged layers are
    refused (``unmerge_tied_lora`` first, or keep ΔW with ``merge_tied_lora(unload=True)``)."""
    layers = _require_layers(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"{merged[:3]} are merged: unmerge_tied_lora(model) first, or merge_tied_lora(unload=True)")
    for name, layer in layers.items():  # before touching any layer
        _named(name, layer._check_weight_stored, "unload it")
    _unload(model, layers)
    return model


def _named(name: str, check, *args) -> None:
    """``check(*args)``, its RuntimeError prefixed with the layer's name."""
    try:
        check(*args)
    except RuntimeError as e:
        raise RuntimeError(f"{name}: {e}") from None


def _unload(model: nn.Module, layers: dict[str, TiedLoRALinear]) -> None:
    """Put each adapted layer's base (``TiedLoRALinear.to_base``) in its place, and take off the load hook
    (``_fill_tied_aliases``) of the modules with no adapter left: the model is plain again, and pickles and loads
    without this library."""
    for name, layer in layers.items():
        _set_submodule(model, name, layer.to_base())
    _unwrapped(model).__dict__.pop("tied_lora_config", None)
    for module in model.modules():
        hooks = module._load_state_dict_pre_hooks
        ours = [key for key, h in hooks.items() if getattr(h, "hook", None) is _fill_tied_aliases]
        if ours and not tied_lora_layers(module):
            for key in ours:
                del hooks[key]


def unmerge_tied_lora(model: nn.Module) -> nn.Module:
    """Take every adapter back out of its base weight (``TiedLoRALinear.unmerge``); all or none: a layer that is
    not merged is refused (RuntimeError) before any is touched."""
    layers = _require_layers(model)
    unmerged = [name for name, layer in layers.items() if not layer.merged]
    if unmerged:  # before touching any layer
        raise RuntimeError(f"cannot unmerge layers that are not merged ({unmerged[:3]})")
    for name, layer in layers.items():
        _named(name, layer._check_weight_stored, "unmerge")
    for layer in layers.values():
        layer.unmerge()
    return model


@contextlib.contextmanager
def disable_tied_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every adapted layer runs its base linear alone: the model computes what it computed before
    ``apply_tied_lora`` (bit for bit, unless a merge and unmerge rounded the weights since; ``modules_to_save`` keep
    their trained values, with a warning) and the adapter gets no gradient — e.g. a DPO reference model, or an
    evaluation without the adapter. Merged layers are refused (their weight holds ΔW: ``unmerge_tied_lora`` first).
    Blocks nest; each layer's previous state returns on exit. Under activation checkpointing a backward recomputes the
    layers' forward with the flags of that moment: call it inside the block (or run the block under
    ``torch.no_grad()``); one after the block would differentiate the adapter on (a warning says so when grad is on and
    a Hugging Face model checkpoints reentrantly; the non-reentrant kind raises a ``CheckpointError`` then)."""
    layers = _require_layers(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(
            f"cannot disable merged adapters ({merged[:3]}...): their weights hold ΔW; unmerge_tied_lora(model) first"
        )
    config = getattr(_unwrapped(model), "tied_lora_config", None)
    if config is not None and config.modules_to_save:
        warnings.warn(
            f"disable_tied_lora: the modules_to_save {list(config.modules_to_save)} keep their trained values inside "
            "the block (no untrained copy is kept, unlike PEFT's disable_adapter)",
            stacklevel=3,
        )
    # (the silent case: the non-reentrant kind raises a CheckpointError instead; it checkpoints in training mode)
    if torch.is_grad_enabled() and model.training and _reentrant_checkpointing(model):
        warnings.warn(
            "disable_tied_lora with grad enabled on a model that checkpoints activations reentrantly: if the "
            "backward runs after the block, it recomputes the checkpointed layers with the adapter on (PEFT's "
            "disable_adapter alike) and gives the adapter wrong gradients. Call backward inside the block (then "
            "this warning does not apply), or run the block under torch.no_grad() (a reference model's forward)",
            stacklevel=3,
        )
    saved = {name: layer.disabled for name, layer in layers.items()}
    for layer in layers.values():
        layer.disabled = True
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.disabled = saved[name]


def _adapter_parameters(layer: TiedLoRALinear) -> tuple:
    """``(A, B, u, v)`` as the parameters the layer uses: the shared pair whole (a grouped layer's ``B`` holds the
    rows of every member: ``TiedLoRALinear._factors`` gives this layer's), ``u`` and ``v`` None where frozen at one."""
    return layer.shared.A, layer.shared.B, layer.lora_u, layer.lora_v


def _adapter_params(layers: dict[str, TiedLoRALinear]) -> set[int]:
    return {id(p) for layer in layers.values() for p in _adapter_parameters(layer) if p is not None}


def _refuse_parametrized(layers: dict[str, TiedLoRALinear]) -> None:
    """Refuse adapter factors under ``torch.nn.utils.parametrize`` (``orthogonal(layer.shared, "A")``): each is then
    computed from another parameter at every read, so it is no parameter of the model to save, load or replicate
    (the adapter's tensors would silently lack it)."""
    found: dict[tuple[int, str], str] = {}  # each tensor once, under its first name
    for name, layer in layers.items():
        for owner, attr, where in (
            (layer.shared, "A", ".shared"),
            (layer.shared, "B", ".shared"),
            (layer.lora_scale, "u", ".lora_scale"),
            (layer, "lora_v", ""),
        ):
            if torch.nn.utils.parametrize.is_parametrized(owner, attr):
                found.setdefault((id(owner), attr), f"{name}{where}.{attr}")
    if found:
        raise ValueError(
            f"{list(found.values())[:3]} are parametrized (torch.nn.utils.parametrize): an adapter holds plain "
            "parameters. Take the parametrization off first: parametrize.remove_parametrizations(module, name) keeps "
            "the values it computes"
        )


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s, (Distributed)DataParallel's and ``AveragedModel``'s (an EMA or SWA
    copy: its averaged tensors) wrappers, whose names carry a prefix (``_orig_mod.``, ``module.``) that an adapter
    file must not depend on."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel, torch.optim.swa_utils.AveragedModel)
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):  # torch.compile's OptimizedModule
            model = inner
        elif isinstance(model, wrappers):
            model = model.module
        else:
            return model


def _refuse_inner_compile_wrappers(model: nn.Module, doing: str) -> None:
    """Refuse ``doing`` (saving, loading, exporting) on a model with a part replaced by its ``torch.compile``
    wrapper (``model.layers[i] = torch.compile(layer)``, regional compilation): the wrapper registers the part as
    its child ``_orig_mod``, which every name below it would carry into the adapter's file, where the same model
    uncompiled (or PEFT, reading an export) would find none of them. A wrapper around the whole model is looked
    through (``_unwrapped``); ``layer.compile()`` compiles a part in place and keeps the names."""
    inner = [name for name, module in model.named_modules() if name and "_orig_mod" in module._modules]
    if inner:
        raise ValueError(
            f"{doing} a model with parts replaced by their torch.compile wrappers ({first_names(inner, 3)}): their "
            "names carry '_orig_mod.', which an adapter's file must not depend on. Compile those parts in place "
            "instead (layer.compile(): the same compiled code, names unchanged), or do this with the uncompiled parts"
        )


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameters, each tensor counted once however many layers share it (a bitsandbytes
    4-bit weight as the values it packs, two per byte of storage)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 * p.element_size() if getattr(p, "bnb_quantized", False) else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return ParameterCount(trainable, total)
