"""Which layers a ``TiedLoRAConfig`` adapts in a model, and how they tie: target selection (names, regular
expressions, callables, ``"all-linear"`` and what it leaves out: output heads, layers whose weight their parent reads
itself, weights tied to another module), the checks each target must pass, the plan of tie groups and shapes,
and the modules and tensors of ``modules_to_save``. Package-internal: ``model.py`` adapts with it, and saving,
loading, the PEFT import and export look up the same targets and saved tensors.
"""

from __future__ import annotations

import itertools
import re
import sys
import warnings
from collections.abc import Mapping, Sequence, Set
from typing import Any

import torch
from torch import nn

from tied_lora_kernels.base_layers import (
    adaptable_types,
    check_linear_type,
    check_plain_weight,
    linear_features,
    quantized_linear_types,
)
from tied_lora_kernels.config import ALL_LINEAR, QKV, TiedLoRAConfig
from tied_lora_kernels.layer import TiedLoRALinear


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


def _input_dtype(linear: nn.Module) -> torch.dtype | None:
    """The dtype a base layer computes in: a quantized one's ``compute_dtype`` (None until bitsandbytes has seen
    an input), else its weight's; None when unknown."""
    weight: Any = linear.weight
    dtype: torch.dtype = getattr(linear, "compute_dtype", None) or weight.dtype
    return dtype if dtype.is_floating_point else None


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


def _heads(model: nn.Module) -> list[str]:
    """The modules ``"all-linear"`` leaves out, with what they contain: a Hugging Face model's output embeddings
    (lm_head), else its classification head (``score`` or ``classifier``), as PEFT does for the head with
    ``task_type="SEQ_CLS"`` (without a task type PEFT 0.21 adapts a classifier's linears)."""
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
