"""``export_peft_lora``: a Tied-LoRA adapter written as a standard PEFT LoRA adapter, for the tools that serve or
load LoRA adapters (PEFT's ``PeftModel.from_pretrained``, vLLM's and TGI's multi-LoRA serving, ...).

Every adapted layer's update is already a rank-``r`` product:

    ΔW = s · diag(v) · B · diag(u) · A = B' · A        B' = s · (v ⊙ B) ⊙ u  [out, r],   A  [r, in]

so each layer becomes one LoRA pair, ``lora_A = A`` and ``lora_B = B'``, with ``lora_alpha = r`` (PEFT's scaling
``lora_alpha / r`` is then 1). ``B'`` is computed in float64 and rounded once to the file's dtype. The ties are
not kept: the file holds a pair per layer (the tied ``A`` once per layer), so it is larger than
``save_tied_lora``'s, which remains the way to save an adapter for further training.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn

from tied_lora_kernels.functional import first_names
from tied_lora_kernels.layer import _own_rows
from tied_lora_kernels.model import (
    _is_adapter_tensor,
    _require_layers,
    _unwrapped,
    tied_lora_layers,
)
from tied_lora_kernels.save_load import _refuse_meta, _write_on_rank0, tied_lora_state_dict
from tied_lora_kernels.targets import (
    _named_tensors,
    _names_of_parameters,
    _saved_modules,
)

__all__ = ["export_peft_lora"]

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"


def export_peft_lora(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
    task_type: str | None = "auto",
    gather: bool = False,
) -> None:
    """Write ``directory/adapter_model.safetensors`` and ``adapter_config.json`` in PEFT's LoRA format.

    Load it with ``peft.PeftModel.from_pretrained(base, directory)`` where ``base`` is the model ``model`` was
    adapted from (the same class: module names must match), or serve it as a LoRA adapter. ``dtype``: the
    tensors' dtype (default: the adapters'). ``base_model_name_or_path`` is recorded in the config, as PEFT
    does. ``lora_dropout``: the layers' dropout when they all use one, else the config's (without a config, the one
    most layers use), with a warning (PEFT's config has one). ``modules_to_save`` go in as PEFT writes them (full
    tensors, in their own dtype).
    ``target_modules`` holds the layers' short names (``q_proj``, ...) when every module of the model with those
    names is adapted, else a regular expression that matches exactly their qualified names (PEFT matches a list
    of names as suffixes, a string as a full-match regex). Refuses merged layers, whose ΔW is in the base weights
    already, and meta-device adapters. ``task_type`` (PEFT's: ``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...; what
    ``AutoPeftModel...`` needs; None writes none): ``"auto"`` takes ``"CAUSAL_LM"`` for the classes transformers
    maps as causal LMs (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...) and ``"SEQ_2_SEQ_LM"`` for its text
    seq2seq LMs; other models get none (PEFT's classifier task types expect their head in the file, as
    ``modules_to_save``: pass ``task_type`` to record one). A headless Hugging Face model that ``apply_tied_lora``
    did not adapt itself, such as the ``.model`` inside an adapted ``LlamaForCausalLM``, gets a warning: its names
    lack the prefix the full model's have, so PEFT would load nothing into the full model. So do adapted layers
    that PEFT's loader would leave out of this model, or a file it would refuse (``_peft_load_problem``: some MoE
    models' dense MLPs, a Mamba model's ``out_proj``). ``gather=True`` (FSDP2 with tensors of the adapter or of
    ``modules_to_save`` sharded): every rank calls it, the shards are gathered (``tied_lora_state_dict``) and rank
    0 alone writes; every rank returns once it has written (or raises if it failed).
    """
    from safetensors.torch import save_file

    model = _unwrapped(model)
    layers = _require_layers(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(
            f"cannot export merged layers ({merged[:3]}): their ΔW is in the base weights; unmerge_tied_lora first"
        )
    whole = _refuse_meta(tied_lora_state_dict(model, gather=gather), "exporting")
    name_of = {id(t): name for name, t in _named_tensors(model).items()}  # (the state's names)

    def value(t: torch.Tensor) -> torch.Tensor:  # the tensor as saved: gathered whole where FSDP sharded it
        return whole.get(name_of.get(id(t), ""), t).detach()

    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    ranks = {layer.rank for layer in layers.values()}
    if len(ranks) > 1:  # one config rank adapts every layer; a hand-built model could mix them
        raise ValueError(f"the adapted layers have several ranks {sorted(ranks)}: PEFT's LoRA config has one")
    rank = ranks.pop()
    config = getattr(model, "tied_lora_config", None)
    headless = config is None and getattr(model, "base_model", None) is model  # a headless transformers model
    if task_type == "auto":
        task_type = _task_type(model)
    elif task_type is not None:
        _check_task_type(task_type)

    def write() -> None:  # (on rank 0 alone with gather=True: the others have gathered and checked as it has)
        # its warnings too, once per save (stacklevel 4: write, _write_on_rank0, export_peft_lora, the caller)
        if headless:
            warnings.warn(
                f"export_peft_lora: this {type(model).__name__} has no head and is not the model apply_tied_lora "
                "adapted: if it is the .model of an adapted ForCausalLM (or the like), the file's names do not fit "
                "the full model and PEFT loads nothing into it; export the adapted model itself",
                stacklevel=4,
            )
        state = {}
        for name, layer in layers.items():
            A = value(layer.shared.A)
            B = _own_rows(value(layer.shared.B), layer.b_rows).double() * layer.scale
            if layer.lora_v is not None:
                B = B * value(layer.lora_v).double()[:, None]
            if layer.lora_u is not None:
                B = B * value(layer.lora_u).double()[None, :]
            out = dtype or A.dtype
            # own copies: safetensors refuses tensors that share memory (the tied A of every layer)
            state[f"base_model.model.{name}.lora_A.weight"] = A.to("cpu", out, copy=True).contiguous()
            state[f"base_model.model.{name}.lora_B.weight"] = B.to("cpu", out, copy=True).contiguous()

        saved = _modules_to_save(model)
        # every name of a saved module's tensor: PEFT looks each modules_to_save module up under its own name, so a
        # weight tied between two of them (lm_head and embed_tokens with tied embeddings) goes in under both
        aliases = {name: names for names in _names_of_parameters(model).values() for name in names}
        for name, tensor in whole.items():  # modules trained in full, under their own names
            if not _is_adapter_tensor(name):
                for alias in aliases.get(name, [name]):
                    state[f"base_model.model.{alias}"] = tensor.to("cpu", copy=True).contiguous()
        targets = _target_names(model, set(layers))
        # PEFT's config has one dropout: the layers' when they agree (set after apply_tied_lora, or turned off by
        # TRL's disable_dropout), else the config's (layers adapted by hand: the one most of them use), with a warning
        dropouts = {name: layer.lora_dropout for name, layer in layers.items()}
        counts = Counter(dropouts.values())
        dropout = next(iter(counts))
        if len(counts) > 1:
            dropout, source = (
                (config.dropout, "the config's")
                if config is not None
                else (counts.most_common(1)[0][0], "the most common")
            )
            others = [name for name, p in dropouts.items() if p != dropout]
            warnings.warn(
                f"export_peft_lora: the adapted layers train with different dropouts, and PEFT's config holds one "
                f"lora_dropout: the file says {dropout} ({source}), which {first_names(others, 3)} do not use (this "
                "changes training after loading into PEFT, not what the adapter computes)",
                stacklevel=4,
            )
        peft_config = {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path,
            "r": rank,
            "lora_alpha": rank,  # scaling 1: s is folded into lora_B
            "lora_dropout": dropout,
            "target_modules": targets,
            "bias": "none",
            # PEFT's flag for GPT-2's Conv1D (weight stored [in, out]); lora_A/lora_B are [r, in]/[out, r] either way
            "fan_in_fan_out": all(layer.fan_in_fan_out for layer in layers.values()),
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": saved or None,
        }
        problem = _peft_load_problem(model, targets, set(layers))
        if problem:
            warnings.warn(
                f"export_peft_lora: {problem}. The file is written as for any model (PEFT's loader converts these "
                "names for adapters trained with transformers 4); for PEFT, adapt without those layers, or "
                "merge_tied_lora",
                stacklevel=4,
            )
        os.makedirs(directory, exist_ok=True)
        save_file(state, os.path.join(directory, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(directory, PEFT_CONFIG_NAME), "w") as f:
            json.dump(peft_config, f, indent=2)

    _write_on_rank0(gather, write, directory)


_PEFT_CHILDREN = tuple(
    f"{kind}{adapter}"
    for kind in ("base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B")
    for adapter in ("", ".default")
)
"""The modules a PEFT LoRA layer holds (its adapter named ``"default"``, as ``PeftModel.from_pretrained`` names it)."""


def _modules_to_save(model: nn.Module) -> list[str]:
    """The qualified names of the modules the config saves, as PEFT's ``modules_to_save``: PEFT wraps every module
    whose name ends with an entry (a plain suffix: ``"norm"`` would take each ``input_layernorm`` too, where
    Tied-LoRA's ``"norm"`` is a name or a ``.norm`` suffix), so the entries are the full names, refused if they
    still select another module (``"model.norm"`` within ``"vision_model.norm"``)."""
    saved = []
    for name, module in model.named_modules():  # (the model's own, and those of parts adapted apart)
        config = module.__dict__.get("tied_lora_config")
        if config is not None and config.modules_to_save:
            saved += [f"{name}.{n}" if name else n for n in _saved_modules(module, config, {})]
    if not saved:
        return []
    saved.sort()
    # the names PEFT's model has: the base model's, with PEFT's own children in each adapted layer instead of ours
    layers = set(tied_lora_layers(model))
    within = tuple(f"{layer}." for layer in layers)
    names = {n for n, _ in model.named_modules(remove_duplicate=False) if not n.startswith(within)}
    names |= {f"{layer}.{child}" for layer in layers for child in _PEFT_CHILDREN}
    others = sorted({n for n in names for s in saved if n.endswith(s)} - set(saved))
    if others:
        raise ValueError(
            f"modules_to_save {saved} would also select {others[:4]} in PEFT, which takes every module whose name "
            "ends with one of them: PEFT could not load the file; save those modules too, or leave the others out"
        )
    return saved


def _peft_load_problem(model: nn.Module, target_modules: list[str] | str, adapted: set[str]) -> str | None:
    """What ``PeftModel.from_pretrained`` would do wrong with the exported adapter on this model, as the installed
    PEFT's own config conversion decides (None without PEFT): under transformers 5, PEFT rewrites the
    transformers-4 expert names of some MoE model types (``gate_proj``, ``up_proj``, ``down_proj`` of Qwen2-MoE-like
    models such as DeepSeek-V3, Mixtral's ``w1``/``w2``/``w3``) into the fused experts' parameters, which takes
    those names from a dense MLP or a shared expert too (their pairs are not loaded), and refuses a part of a fused
    pair alone (``gate_proj`` without ``up_proj``); no spelling of ``target_modules`` escapes it."""
    try:
        import peft
        import peft.tuners.tuners_utils as tuners_utils
    except ImportError:  # (no PEFT)
        return None
    try:
        conversion: Any = importlib.import_module("peft.utils.transformers_weight_conversion")
    except ImportError:  # (a PEFT before 0.19, which does not rewrite expert names)
        conversion = None
    probe = peft.LoraConfig(r=1, target_modules=target_modules)
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    # LoRA on Mamba models' out_proj and conv1d (falcon_mamba's out_proj is a linear the model calls)
    check_mamba: Any = getattr(tuners_utils, "_check_lora_target_modules_mamba", None)
    for short in sorted({n.rpartition(".")[2] for n in adapted}) if check_mamba is not None else ():
        try:
            check_mamba(probe, model, short)
        except ValueError as e:
            return f"PEFT would refuse to load it into this {kind} model ({e})"
        except Exception:  # (a private function of PEFT's, as below)
            break
    if conversion is None:
        return None
    try:
        conversion.convert_peft_config_for_transformers(probe, model=model, conversions=None)
    except ValueError as e:  # PEFT's refusal, which from_pretrained would raise
        return f"PEFT would refuse to load it into this {kind} model ({e})"
    except Exception:  # a private function of PEFT's: if it changed, there is nothing to say
        return None
    if not probe.target_parameters:
        return None
    kept = {probe.target_modules} if isinstance(probe.target_modules, str) else set(probe.target_modules or ())
    dropped = sorted(n for n in adapted if not any(n == k or n.endswith("." + k) for k in kept))
    names = sorted({n.rpartition(".")[2] for n in dropped})
    shown = ", ".join(dropped[:3]) + (", ..." if len(dropped) > 3 else "")
    return (
        f"PEFT reads the names {names} of this {kind} model as its fused MoE experts, whatever module they name, so "
        f"PeftModel.from_pretrained would not load the pairs of {len(dropped)} adapted layers ({shown}) and would "
        "give the experts zero-initialised ones instead"
    )


def _task_type(model: nn.Module) -> str | None:
    """PEFT's task type for the model's class, from transformers' auto-class tables: causal LMs and text seq2seq
    LMs only (a speech seq2seq model's forward does not fit PEFT's ``PeftModelForSeq2SeqLM``). The class's bases
    count: FSDP2 makes an ``FSDPLlamaForCausalLM`` of a ``LlamaForCausalLM`` it shards."""
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:
        return None
    names = {cls.__name__ for cls in type(model).__mro__}
    if names & set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return "CAUSAL_LM"
    text = getattr(model, "main_input_name", "input_ids") == "input_ids"
    if text and names & set(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values()):
        return "SEQ_2_SEQ_LM"
    return None


def _check_task_type(task_type) -> None:
    try:
        from peft import TaskType
    except ImportError:
        return
    known = [t.value for t in TaskType]
    if task_type not in known:
        raise ValueError(f"task_type must be one of PEFT's {known}, 'auto' or None, got {task_type!r}")


def _target_names(model: nn.Module, adapted: set[str]) -> list[str] | str:
    """Short names if they pick out exactly the adapted layers (PEFT matches a name or a ``.name`` suffix), else
    a regular expression PEFT full-matches against each qualified name."""
    short = {name.rpartition(".")[2] for name in adapted}
    matching = {name for name, _ in model.named_modules() if name.rpartition(".")[2] in short}
    if matching == adapted:
        return sorted(short)
    return "|".join(re.escape(name) for name in sorted(adapted))
