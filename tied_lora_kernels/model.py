"""Model-level helpers: adapt a model in place, merge/unmerge/unload, disable, count.

``apply_tied_lora`` replaces every targeted ``nn.Linear`` by a ``TiedLoRALinear`` and creates one
``TiedLoRAShared`` per tie group and shape (a group: one role, the targets whose names differ only in their
numeric parts such as layer indices; per layer instead when ``tie`` is off). Saving and loading the adapter:
``save_load.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from typing import Any, NamedTuple

import torch
from torch import nn

from tied_lora_kernels.config import ALL_LINEAR, QKV, TiedLoRAConfig
from tied_lora_kernels.functional import first_names
from tied_lora_kernels.layer import (
    TiedLoRALinear,
    adaptable_types,
    carry_hooks,
    check_linear_type,
    check_plain_weight,
    linear_features,
    qualified_name,
    quantized_linear_types,
)
from tied_lora_kernels.shared import TiedLoRAShared

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
    model with reentrant gradient checkpointing on, calls ``enable_input_require_grads()`` (as PEFT does)."""
    if isinstance(model, nn.Module) and isinstance(config, TiedLoRAConfig):  # (before: -W error leaves it as it was)
        _warn_unmatched_names(config, model)
    return _apply(model, config)


def _warn_unmatched_names(config: TiedLoRAConfig, model: nn.Module) -> None:
    """A warning naming the entries of a list of ``target_modules`` that matched no module of ``model`` (before it
    is adapted), where others matched: the layers a misspelt name was meant to adapt would train nothing, silently
    (no match at all is an error, ``_find_targets``; PEFT warns of neither). It names the model's fused MoE experts
    if it has any (transformers 5's Mixtral, Qwen-MoE, ...: their ``gate_up_proj``/``down_proj`` are 3-D
    parameters, where a PEFT recipe names linears)."""
    names = [n for n, _ in model.named_modules()]
    if config.groups != (QKV,):  # a group set by hand of which some names match and others match nothing: a typo?
        for group in config.groups:
            missing = [t for t in group if not any(_names(n, t) for n in names)]
            if missing and len(missing) < len(group):
                warnings.warn(
                    f"groups: {missing} of {group} matched no module of the model: a misspelt name? The group's "
                    "other members are grouped without them",
                    stacklevel=3,
                )
    if callable(config.target_modules) or isinstance(config.target_modules, str):  # ("all-linear", a regex)
        return
    unmatched = [t for t in config.target_modules if not any(_names(n, t) for n in names)]
    if unmatched and len(unmatched) < len(config.target_modules):
        default = " (TiedLoRAConfig's default)" if config.target_modules == QKV else ""
        fused = _fused_experts(model)
        why = (
            f". The model's MoE experts are fused 3-D parameters ({list(fused[:2])}...), not linear layers: "
            "Tied-LoRA cannot adapt them"
            if fused
            else ""
        )
        warnings.warn(
            f"target_modules{default} {unmatched} matched no module of the model and adapt nothing (the other names "
            f"were adapted): a misspelt name? Leave names of other architectures out to silence this{why}",
            stacklevel=3,
        )


def _fused_experts(model: nn.Module) -> list[str]:
    """The names of the 3-D parameters of ``model``'s MoE expert modules (transformers 5's ``MixtralExperts``,
    ``Qwen3MoeExperts``, ...: every expert's weight fused into one)."""
    return [
        f"{name}.{p_name}" if name else p_name
        for name, module in model.named_modules()
        if "experts" in type(module).__name__.lower()
        for p_name, p in module.named_parameters(recurse=False)
        if p.dim() == 3
    ]


def _names(qualified: str, wanted: str) -> bool:
    """Whether a module's qualified name is what a name in ``target_modules`` or ``modules_to_save`` means: equal to
    it, or ending with ``"." + wanted``."""
    return qualified == wanted or qualified.endswith("." + wanted)


def _apply(model: nn.Module, config: TiedLoRAConfig, shared_of: dict[str, str] | None = None) -> nn.Module:
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
        hooked = getattr(model, "_require_grads_hooks", None)  # (what enable_input_require_grads registered)
        if _reentrant_checkpointing(model) and callable(enable_input_grads) and not hooked:
            # as PEFT does when it wraps a checkpointing model: reentrant checkpointing gives no gradient to a layer
            # whose input does not require one, and transformers makes the input embeddings' output require it only
            # for models whose main input is input_ids (not Whisper's input_features, say)
            enable_input_grads()
    return model


@contextlib.contextmanager
def _undone_on_error(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Put a bare ``model`` back as it was if the block (``_apply`` on the layers ``names``, then checks that need
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
        if model.__dict__.get("_require_grads_hooks") is not before.get("_require_grads_hooks"):
            for handle in model.__dict__["_require_grads_hooks"]:  # (enable_input_require_grads, called by _apply)
                handle.remove()
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


def _input_dtype(linear: nn.Module) -> torch.dtype | None:
    """The dtype a base layer computes in: a quantized one's ``compute_dtype`` (None until bitsandbytes has seen
    an input), else its weight's; None when unknown."""
    weight: Any = linear.weight
    dtype: torch.dtype = getattr(linear, "compute_dtype", None) or weight.dtype
    return dtype if dtype.is_floating_point else None


def _same_values(a, b) -> bool:
    """Whether two state-dict entries hold the same values, NaN equal to NaN (a diverged run's tied tensor, saved
    under each of its names, is still one tensor)."""
    if a is b or not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.is_meta or b.is_meta:
        return True  # nothing to compare: loading reports what is wrong with them
    if a.shape != b.shape:
        return False
    b = b.to(a.device)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _plan(
    targets: dict[str, nn.Linear],
    config: TiedLoRAConfig,
    shared_of: dict[str, str] | None = None,
    listed: Set[str] = frozenset(),
) -> list[tuple[tuple, list[str]]]:
    """``(tie key, member names)`` per group instance, after checking shapes, ranks and devices; ``listed``: the
    targets that are elements of an ``nn.ModuleList``, whose own index does not make a role."""
    plan: list[tuple[tuple, list[str]]] = []
    devices: dict[tuple, torch.device] = {}
    for key, members in _group_instances(targets, config).items():
        linears = [targets[name] for name in members]
        in_features = {linear_features(lin)[0] for lin in linears}
        if len(in_features) > 1:
            raise ValueError(f"grouped layers {members} must share in_features, got {sorted(in_features)}")
        for name, lin in zip(members, linears, strict=True):
            computes = _input_dtype(lin)  # (None: a quantized layer that has not run yet)
            if config.dtype not in (torch.float32, computes) and computes is not None:
                raise TypeError(
                    f"{name} computes in {computes} and the adapters would be {config.dtype}: adapters run beside "
                    f"inputs of their own dtype, or float32 ones beside any. Convert the model to {config.dtype} "
                    "first, or keep float32 adapters (TiedLoRAConfig's default dtype)"
                )
        shape = _shape(linears)
        if shared_of is not None:  # the pairs as an adapter file's layout has them
            tie_key = ("saved", shared_of[members[0]], *shape)
        elif config.resolved["tie"]:  # one pair per role (names equal up to their layer indices) and shape
            label = "*" if members[0] in listed and key[1].isdigit() else key[1]  # a group's label, or the name
            tie_key = (_role(key[0]), label, *shape)
        else:
            tie_key = key
        device = devices.setdefault(tie_key, linears[0].weight.device)
        other = next((lin.weight.device for lin in linears if lin.weight.device != device), None)
        if other is not None:
            raise ValueError(
                f"layers tied together live on several devices ({device} and {other}; {members} among them): a "
                "tied pair lives on one device. Load the model onto one device (device_map={'': 0} rather than "
                "'auto'), or leave the layers untied (TiedLoRAConfig(tie=False), as preset='lora' is)"
            )
        plan.append((tie_key, members))
    return plan


def _shape(linears: Sequence[nn.Module]) -> tuple[int, int]:
    """``(in_features, out_features)`` of the pair that a group's layers share (their outputs stacked)."""
    return linear_features(linears[0])[0], sum(linear_features(lin)[1] for lin in linears)


def _names_of_parameters(module: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter (by ``id``): a tied one has several."""
    names_of: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    return names_of


_WEIGHT_READ_BY_PARENT = {
    "MambaMixer": ("x_proj", "dt_proj", "out_proj"),
    "FalconMambaMixer": ("x_proj", "dt_proj", "out_proj"),
    "JambaMambaMixer": ("dt_proj",),
    "Mamba2Mixer": ("out_proj",),
    "BambaMixer": ("out_proj",),
    "FalconH1Mixer": ("out_proj",),
    "GraniteMoeHybridMambaLayer": ("out_proj",),
    "NemotronHMamba2Mixer": ("out_proj",),
    "Zamba2MambaMixer": ("out_proj",),
    "WavLMAttention": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "LongcatFlashTopkRouter": ("classifier",),
    "TDNNLayer": ("kernel",),
    "MobileBertLMPredictionHead": ("dense", "decoder"),
    "Gemma3nTextAltUp": ("correction_coefs",),
    "LSHSelfAttention": ("query_key", "value"),
    "DetrMHAttentionMap": ("k_proj",),
    "ConditionalDetrMHAttentionMap": ("k_proj",),
    "MaskFormerDetrMHAttentionMap": ("k_proj",),
    "DabDetrMHAttentionMap": ("k_linear",),
    "LayoutLMv2Encoder": ("rel_pos_bias", "rel_pos_x_bias", "rel_pos_y_bias"),
    "LayoutLMv3Encoder": ("rel_pos_bias", "rel_pos_x_bias", "rel_pos_y_bias"),
    "PPDocLayoutV2ReadingOrderEncoder": ("rel_pos_bias", "rel_pos_x_bias", "rel_pos_y_bias"),
    "NeoMMEForMaskedLM": ("unembedding_projection",),
}
"""transformers modules (5.24, 5.25) that read these child linears' weights themselves, instead of calling the
layers, in every path or in one that training or generation takes: a matmul of ``dt_proj.weight`` (Mamba,
Falcon-Mamba, Jamba), the weights handed to the fused CUDA kernels of training (the Mamba and Mamba-2 mixers'
``x_proj``/``out_proj``; PEFT refuses ``out_proj`` of Mamba-based models for this), ``F.multi_head_attention_forward``
(WavLM), ``F.linear`` (LongCat-Flash's router; Gemma-3n's AltUp ``correction_coefs`` in training), ``F.conv1d``
(the x-vector heads' TDNN ``kernel``: Wav2Vec2, WavLM, UniSpeech-SAT, Data2Vec-Audio, Wav2Vec2-Conformer and
-BERT), ``F.conv2d`` (the DETR family's attention maps), a matmul or an index into the weight (MobileBERT's LM head,
Reformer's LSH attention at cached decoding, the relative-position biases of LayoutLMv2, LayoutLMv3 and
PP-DocLayoutV2, NeoMME's unembedding). An adapter there would be skipped, without an error: ``"all-linear"`` leaves
them out and a target naming one is refused (``load_peft_adapter`` skips PEFT's, which its forward skips too).
``tests/test_model.py`` scans the installed transformers' modeling code for such reads (a heuristic: the weight of
a linear the class builds, read as a value in one of its methods, directly or through an argument)."""

_READ_BY_A_FUSED_PATH = {"FalconMambaMixer": ("mamba_inner_fn", ("x_proj", "out_proj"))}
"""Entries above that hold only while the class's module still defines the fused function that reads them:
transformers 5.25 removed Falcon-Mamba's fused training path (``mamba_inner_fn``), and its mixer calls ``x_proj``
and ``out_proj`` since."""


def _read_by_parent(model: nn.Module, name: str) -> str | None:
    """The class name of the transformers module that reads ``name``'s weight itself (``_WEIGHT_READ_BY_PARENT``),
    else None."""
    parent, _, attribute = name.rpartition(".")
    kind = type(model.get_submodule(parent))
    if not kind.__module__.startswith("transformers."):  # (a model's own MambaMixer is not transformers')
        return None
    if attribute not in _WEIGHT_READ_BY_PARENT.get(kind.__name__, ()):
        return None
    fused, attributes = _READ_BY_A_FUSED_PATH.get(kind.__name__, ("", ()))
    if attribute in attributes and not hasattr(sys.modules.get(kind.__module__), fused):
        return None  # (this transformers has no such path)
    return kind.__name__


def _find_targets(model: nn.Module, config: TiedLoRAConfig, *, adapted: bool = False) -> dict[str, nn.Linear]:
    """The layers ``config`` adapts in ``model``, checked (an error names a target that cannot be adapted, or the
    absence of any). ``adapted``: ``model`` is adapted already and the answer is the targets left without an
    adapter (none, unless a layer was replaced after ``apply_tied_lora``), with no error for finding none."""
    targets, owners = {}, _names_of_parameters(model)
    heads = _heads(model) if config.target_modules == ALL_LINEAR else ()
    linear_types = adaptable_types()
    within: tuple[str, ...] = ()  # (adapted layers and what they hold)
    for name, module in model.named_modules():
        if adapted and (isinstance(module, TiedLoRALinear) or name.startswith(within)):
            within += (name + ".",) if isinstance(module, TiedLoRALinear) else ()
            continue
        if callable(config.target_modules):
            hit = bool(config.target_modules(module, name))
        elif config.target_modules == ALL_LINEAR:  # (other subclasses of nn.Linear are left out)
            hit = type(module) in linear_types and not any(name == h or name.startswith(h + ".") for h in heads)
        elif isinstance(config.target_modules, str):  # a regular expression, full-matched as PEFT does
            hit = re.fullmatch(config.target_modules, name) is not None
        else:
            hit = any(_names(name, t) for t in config.target_modules)
        if not hit:
            continue
        reader = _read_by_parent(model, name) if name else None
        if reader is not None and config.target_modules == ALL_LINEAR:
            continue
        if reader is not None:
            raise ValueError(
                f"target {name!r}: its parent {reader} reads {name.rpartition('.')[2]}.weight itself instead of "
                "calling the layer (in every path, or in its CUDA kernels' training path), so an adapter there would "
                "be skipped without an error; leave it out of target_modules ('all-linear' does)"
            )
        check_linear_type(module, f"target {name!r}")
        check_plain_weight(module, f"target {name!r}")
        if config.backend == "triton" and type(module) in quantized_linear_types():
            raise ValueError(
                f"target {name!r} is a quantized {type(module).__name__}: backend='triton' needs plain weights "
                "(quantized layers run their own forward with the adapter on the torch path); use backend='auto'"
            )
        if hasattr(module, "_hf_hook"):  # accelerate's per-layer hooks: offloaded weights, loaded at call time
            raise ValueError(
                f"target {name!r} carries an accelerate hook (a device_map with offloading): its weight is loaded "
                "only while it runs, which an adapted layer cannot follow; load the model onto its devices instead"
            )
        if not name:
            raise ValueError("the model itself matched target_modules: adapt a model that contains the linear")
        others = [n for n in owners.get(id(module.weight), ()) if n != name + ".weight"]
        if others and config.target_modules == ALL_LINEAR:  # (Zamba2's shared transformer: tied across layers)
            continue
        if others:
            raise ValueError(
                f"{name}.weight is shared with {others} (tied weights): merging an adapter into it would change "
                "those too; leave it out of target_modules"
            )
        targets[name] = module
    if not targets and not adapted:
        linears = [n for n, m in model.named_modules() if type(m) in linear_types]
        wanted = config.target_modules
        wanted = f"the callable {getattr(wanted, '__name__', wanted)!r}" if callable(wanted) else repr(wanted)
        found = f"its linear layers include {linears[:8]}"
        if heads:
            found += f" ('all-linear' leaves out {heads[0]!r})"
        # (other subclasses of nn.Linear, such as Llama 4's router, are refused by name)
        subclasses = [
            f"{n} ({type(m).__name__})"
            for n, m in model.named_modules()
            if isinstance(m, linear_types) and type(m) not in linear_types
        ]
        if subclasses:
            found += f"; subclasses of nn.Linear cannot be adapted: {subclasses[:4]}"
        fused = _fused_experts(model)
        if fused:
            found += (
                f"; MoE experts fused into 3-D parameters ({fused[:2]}...) are not linear layers and cannot be adapted"
            )
        raise ValueError(
            f"target_modules={wanted} matched no nn.Linear in the model (a string is a module name unless it holds "
            f"regular-expression characters); {found}"
        )
    return targets


def _saved_modules(model: nn.Module, config: TiedLoRAConfig, targets: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """The modules ``config.modules_to_save`` names (matched as targets are), checked: each name matches, and
    none is or holds an adapted target."""
    found = {}
    for wanted in config.modules_to_save:
        hits = {n: m for n, m in model.named_modules() if n and _names(n, wanted)}
        if not hits:
            raise ValueError(f"modules_to_save: {wanted!r} matches no module of the model")
        found.update(hits)
    owners = _names_of_parameters(model)
    within = tuple(name + "." for name in found)
    for name, module in found.items():
        inside = [t for t in targets if t == name or t.startswith(name + ".")]
        if inside:
            raise ValueError(f"modules_to_save: {name!r} is or holds adapted targets {inside[:3]}; leave one out")
        for p_name, p in module.named_parameters():
            # a weight tied to a module left out (a language model's lm_head and its input embeddings) would train
            # that module too, and the file would hold it under the other module's name
            others = [n for n in owners[id(p)] if not n.startswith(within)]
            if others:
                raise ValueError(
                    f"modules_to_save: {name}.{p_name} is shared with {others[:3]} (tied weights): training it "
                    "would train those too; untie them first or save those modules as well"
                )
    return found


def _saved_tensor_ids(modules: Mapping[str, nn.Module]) -> set[int]:
    """The ids of the tensors of ``modules`` (``_saved_modules``) that their state dicts hold: parameters and
    persistent buffers (BatchNorm's running statistics, which PEFT's ``modules_to_save`` saves too)."""
    ids = {id(p) for m in modules.values() for p in m.parameters()}
    for m in modules.values():
        for sub in m.modules():
            ids |= {
                id(b) for k, b in sub._buffers.items() if b is not None and k not in sub._non_persistent_buffers_set
            }
    return ids


def _saved_ids(model: nn.Module) -> set[int]:
    """The ids of the tensors (``_saved_tensor_ids``) of every config's ``modules_to_save`` in ``model``: the
    model's own and those of parts adapted apart, inside a wrapper with no config."""
    ids: set[int] = set()
    for module in model.modules():
        config = module.__dict__.get("tied_lora_config")
        if config is not None and config.modules_to_save:
            ids |= _saved_tensor_ids(_saved_modules(module, config, {}))
    return ids


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s parameters and buffers by name, each once (a tied one under the first name PyTorch gives it)."""
    return dict(itertools.chain(model.named_parameters(), model.named_buffers()))


_FACTOR_OF = {".shared.A": "A", ".shared.B": "B", ".lora_scale.u": "u", ".lora_v": "v"}
"""How the names of adapter tensors end (``TiedLoRAShared``'s pair, ``UScale``'s ``u``, a layer's ``v``), and the
factor each is; the other tensors of an adapter file are those of ``modules_to_save``."""


def _is_adapter_tensor(name: str) -> bool:
    return name.endswith(tuple(_FACTOR_OF))


def _heads(model: nn.Module) -> list[str]:
    """The modules ``"all-linear"`` leaves out, with what they contain, as PEFT does: a Hugging Face model's output
    embeddings (lm_head), else its classification head (``score`` or ``classifier``)."""
    get = getattr(model, "get_output_embeddings", None)
    output = get() if callable(get) else None
    heads = [output] if output is not None else [getattr(model, name, None) for name in ("score", "classifier")]
    heads = [head for head in heads if isinstance(head, nn.Module)]
    return [name for name, module in model.named_modules() if any(module is head for head in heads)]


def _role(name: str) -> str:
    """A module's name with its numeric parts (layer, expert indices) as ``*``: what a tie shares across."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _group_instances(targets: dict[str, nn.Linear], config: TiedLoRAConfig) -> dict[tuple, list[str]]:
    """``(parent, label) -> member names``: grouped targets of one parent together, in group order."""
    group_of = {role: g for g in config.groups for role in g}
    position = {role: i for g in config.groups for i, role in enumerate(g)}
    instances: dict[tuple, list[str]] = {}
    for name in targets:
        parent, _, role = name.rpartition(".")
        key = (parent, "group:" + "+".join(group_of[role])) if role in group_of else (name, role)
        instances.setdefault(key, []).append(name)
    for members in instances.values():  # grouped members in group order (ungrouped ones are alone)
        members.sort(key=lambda n: position.get(n.rpartition(".")[2], 0))
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
    """Fold every adapter into its base weight. ``unload=True`` then puts the base layers (``nn.Linear``,
    ``Conv1D``, ``FalconLinear``; sharing the merged weights) back in place, for export (layers merged already are
    unloaded as they are); otherwise ``unmerge_tied_lora`` undoes it, and merging a merged layer again raises."""
    layers = _require_layers(model)
    for name, layer in layers.items():  # before touching any layer
        if layer.merged and not unload:
            raise RuntimeError(f"{name} is already merged: unmerge_tied_lora(model) first, or merge with unload=True")
        if layer.merged:
            _named(name, layer._check_weight_stored, "unload it")
        else:
            _named(name, layer.check_mergeable)
    for layer in layers.values():
        if not (unload and layer.merged):
            layer.merge()
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
    """Take every adapter back out of its base weight."""
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
    """Within the block every adapted layer runs its base linear alone: the model computes what it computed
    before ``apply_tied_lora`` (bit for bit; ``modules_to_save`` keep their trained values, with a warning) and
    the adapter gets no gradient — e.g. a DPO reference model, or an evaluation without the adapter. Merged
    layers are refused (their weight holds ΔW: ``unmerge_tied_lora`` first). Blocks nest; each layer's previous
    state returns on exit. Under activation checkpointing a backward recomputes the layers' forward with the flags
    of that moment: call it inside the block (or run the block under ``torch.no_grad()``); one after the block
    would differentiate the adapter on (a warning says so when grad is on and a Hugging Face model checkpoints
    reentrantly; the non-reentrant kind raises a ``CheckpointError`` then)."""
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


def _factors(layer: TiedLoRALinear) -> tuple:
    return layer.shared.A, layer.shared.B, layer.lora_u, layer.lora_v


def _adapter_params(layers: dict[str, TiedLoRALinear]) -> set[int]:
    return {id(p) for layer in layers.values() for p in _factors(layer) if p is not None}


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
