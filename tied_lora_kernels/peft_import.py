"""``load_peft_adapter``: a PEFT LoRA or VeRA adapter onto a bare model, as the Tied-LoRA configuration that computes
the same thing — so an adapter trained with PEFT runs (and trains on) this library's kernels.

Both are points of the Tied-LoRA family (``ΔW = s · diag(v) · B · diag(u) · A``):

- **LoRA** (``ΔW = (lora_alpha / r) · lora_B · lora_A``, ``/ sqrt(r)`` with rsLoRA): the untied ``"lora"`` preset,
  one pair per layer (``tie=False``, ``groups=()``), ``A = lora_A``, ``B = lora_B``, ``u`` and ``v`` frozen at one,
  ``alpha`` chosen so that ``alpha / r`` is PEFT's scaling;
- **VeRA** (``ΔW = diag(λ_b) · vera_B[:out] · diag(λ_d) · vera_A[:, :in]``, one frozen pair for the whole model,
  sliced per layer): the ``"vera"`` preset, ``u = λ_d``, ``v = λ_b``, each role's tied pair the slices of PEFT's.

``export_peft_lora`` goes the other way (any configuration to a LoRA file).
"""

from __future__ import annotations

import math
import os
import re
import warnings

import torch
from torch import nn

from tied_lora_kernels.base_layers import linear_features
from tied_lora_kernels.config import TiedLoRAConfig
from tied_lora_kernels.model import (
    _adapt,
    _refuse_distributed,
    _refuse_inner_compile_wrappers,
    _refuse_peft_model,
    _unwrapped,
    tied_lora_layers,
)
from tied_lora_kernels.save_load import read_json, read_weights
from tied_lora_kernels.targets import (
    _find_targets,
    _input_dtype,
    _names_of_parameters,
    _read_by_parent,
)

__all__ = ["load_peft_adapter"]

_PREFIX = "base_model.model."
_LORA = (".lora_A.weight", ".lora_B.weight")
_VERA = (".vera_lambda_d", ".vera_lambda_b")

# PEFT initialisations that subtract their starting adapter from the base weight (PiSSA, OLoRA, CorDA, LoftQ,
# LoRA-GA): a file saved without PEFT's conversion is the change from that rewritten weight, not from the model's
_REWRITES_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga")

# PEFT options this mapping cannot represent, with the value that means "not used"
_UNSUPPORTED = {
    "use_dora": False,
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "use_bdlora": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "arrow_config": None,
}


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike, *, backend: str = "auto") -> nn.Module:
    """Adapt ``model`` (the base the PEFT adapter was trained on, the same class: module names must match) with the
    PEFT LoRA or VeRA adapter saved in ``directory`` and return it; the layers then compute what PEFT's do (tests:
    logits within 1e-12 of ``PeftModel.from_pretrained`` in float64). The adapter trains as PEFT's did (LoRA:
    ``A`` and ``B``; VeRA: ``u`` and ``v``) and saves with ``save_tied_lora``. The other tensors of the file —
    ``modules_to_save`` and embedding layers saved with ``save_embedding_layers`` — go into their modules, which
    become this adapter's ``modules_to_save`` (trained in full and saved with it; PEFT trains the embedding
    layers only if they are in its ``modules_to_save``); the base weight of an adapted layer that
    ``save_embedding_layers`` wrote (LoRA on ``lm_head``) must equal the model's; a tied weight saved unchanged
    under each of its names loads as one; a saved module's buffers load too. Exactly the layers the file names are
    adapted. Adapters are float32 (float64 for a float64 file onto float64 layers): widening is exact. A
    ``torch.compile`` wrapper is looked through (and returned: the model as given). Every check runs before the
    model is touched; refused: an adapted or PEFT model, other PEFT methods, LoRA variants (DoRA, MiCA, KaSA, ...),
    initialisations that take their start out of the base weight (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), LoRA on
    embedding layers, per-layer ranks or alphas, trained biases, a VeRA file saved without its projections, a saved
    module whose weight this model ties to another (PEFT unties it), and LoRA on a layer whose weight is tied to
    another (``lm_head`` with tied embeddings). ``backend``: the adapted layers' (``tied_lora_linear``'s)."""
    wrapped, model = model, _unwrapped(model)
    _refuse_inner_compile_wrappers(model, "loading a PEFT adapter into")
    if tied_lora_layers(model):
        raise RuntimeError("this model already has Tied-LoRA adapters: load a PEFT adapter onto the bare base model")
    _refuse_peft_model(model)
    _refuse_distributed(wrapped)
    meta, state = _read(directory)
    kind = meta.get("peft_type")
    if kind not in ("LORA", "VERA"):
        raise ValueError(f"{directory} holds a PEFT {kind} adapter; only LORA and VERA map onto Tied-LoRA")
    used = [k for k, off in _UNSUPPORTED.items() if meta.get(k, off) not in (off, None, {}, [], False)]
    init = str(meta.get("init_lora_weights", True)).lower()
    if init == "mica":  # MiCA freezes lora_B
        used.append("init_lora_weights='mica'")
    if init.startswith(_REWRITES_BASE):
        raise ValueError(
            f"the PEFT adapter was initialised with init_lora_weights={meta['init_lora_weights']!r}, which takes its "
            "starting adapter out of the base weights (PEFT redoes that when it loads the file): the file alone is "
            "not the update. Convert it to a plain LoRA adapter with PEFT (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)), then load that"
        )
    if used:
        why = ""
        if "target_parameters" in used:  # (the user may not have set it: PEFT does, with the patterns)
            why = (
                " (target_parameters is LoRA on parameters, such as the fused experts of transformers 5's MoE "
                "models, which PEFT adds by itself for 'all-linear' on such a model, with a rank_pattern and "
                "alpha_pattern for the fused ones)"
            )
        raise ValueError(f"the PEFT adapter uses {used}, which Tied-LoRA cannot represent{why}")
    if meta.get("bias", "none") != "none":
        raise ValueError(f"the PEFT adapter trains biases (bias={meta['bias']!r}), which Tied-LoRA does not")
    if any(not k.startswith(_PREFIX) and k not in ("base_model.vera_A", "base_model.vera_B") for k in state):
        raise ValueError(f"unexpected tensor names in {directory}: not a PEFT model's adapter file")

    ends = _LORA if kind == "LORA" else _VERA
    layers = sorted({k[len(_PREFIX) : -len(e)] for k in state for e in ends if k.endswith(e)})
    if not layers:
        raise ValueError(f"{directory} holds no {kind} layers")
    saved = {k[len(_PREFIX) :]: t for k, t in state.items() if k.startswith(_PREFIX) and not k.endswith(ends)}
    # an adapted layer's own weight (and bias), which save_embedding_layers writes when lm_head is a target: it must
    # be this model's (PEFT would load it over the model's; the adapter saved from here would not carry it)
    bases = {}
    for k in list(saved):
        name, sep, what = k.rpartition(".base_layer.")
        if sep and name in layers and what in ("weight", "bias"):
            bases[(name, what)] = saved.pop(k)
    strange = [k for k in saved if any(k.startswith(name + ".") for name in layers)]  # inside an adapted layer
    strange += [k for k in saved if ".lora_" in k or ".vera_" in k or ".base_layer." in k]
    if strange:
        raise ValueError(
            f"the PEFT adapter holds {sorted(set(strange))[:3]}: a LoRA variant or a LoRA layer type (embedding, "
            "convolution) that Tied-LoRA does not represent"
        )
    numbers = ("r", "lora_alpha") if kind == "LORA" else ("r",)
    missing = [k for k in numbers if isinstance(meta.get(k), bool) or not isinstance(meta.get(k), (int, float))]
    if missing:
        raise ValueError(f"the PEFT adapter's config has no number {missing[0]!r}: a damaged adapter_config.json")
    rank = int(meta["r"])
    if kind == "LORA":
        scaling = meta["lora_alpha"] / (math.sqrt(rank) if meta.get("use_rslora") else rank)
        # (alpha / rank may differ from PEFT's scaling in the last bit: no float alpha gives it for every r)
        alpha, preset, tie, dropout = scaling * rank, "lora", False, meta.get("lora_dropout", 0.0)
    else:
        if "base_model.vera_A" not in state or "base_model.vera_B" not in state:
            raise ValueError("the VeRA file holds no vera_A/vera_B (saved with save_projection=False): cannot rebuild")
        alpha, preset, tie, dropout = None, "vera", True, meta.get("vera_dropout", 0.0)
    modules = dict(model.named_modules())
    absent = [name for name in layers if name not in modules]
    if absent:
        raise ValueError(
            f"the PEFT adapter's layers {absent[:3]} are not modules of this {type(model).__name__} (module names "
            "must match: the model the adapter was trained on, of the same class; an adapter saved under "
            "transformers 4's names, such as a LLaVA-style model's language_model.model.layers..., loads in PEFT, "
            "which renames them: load it there and save_pretrained it again)"
        )
    skipped = [name for name in layers if _read_by_parent(model, name)]
    if skipped:  # (PEFT's "all-linear" adapts them)
        why = (
            "their parent module reads the layer's weight itself instead of calling it, so PEFT's forward skips "
            "them too (targets._WEIGHT_READ_BY_PARENT)"
        )
        if len(skipped) == len(layers):
            raise ValueError(f"every layer of the PEFT adapter {skipped[:3]} has its weight read by its parent: {why}")
        warnings.warn(f"the PEFT adapter's pairs of {skipped[:3]} are not loaded: {why}", stacklevel=2)
        layers = [name for name in layers if name not in skipped]
    # float64 adapters only where the layers compute in float64: PEFT's float64 file on another model rounds too
    wide = all(
        isinstance(getattr(modules[name], "weight", None), torch.Tensor)
        and _input_dtype(modules[name]) == torch.float64
        for name in layers
    )
    dtype = torch.float64 if wide and any(t.dtype == torch.float64 for t in state.values()) else torch.float32
    config = TiedLoRAConfig(
        rank=rank,
        alpha=alpha,
        # exactly these layers: a regular expression full-matching their names (a name is also a ".name" suffix)
        target_modules="|".join(f"(?:{re.escape(name)})" for name in layers),
        preset=preset,
        groups=(),
        tie=tie,
        dtype=dtype,
        backend=backend,
        dropout=dropout,
        # the modules the file holds tensors of, by their full names (PEFT's config lists candidates, such as
        # SEQ_CLS's ("classifier", "score"), and matches them as plain suffixes)
        modules_to_save=tuple(sorted({name.rpartition(".")[0] for name in saved})),
    )
    targets = _find_targets(model, config)  # checks only
    missing = sorted(set(layers) - set(targets))
    if missing:
        raise ValueError(f"the PEFT adapter's layers {missing[:4]} are not linear layers of this model")
    for (name, what), tensor in bases.items():
        own = getattr(targets[name], what, None)
        if own is None or own.shape != tensor.shape or not torch.equal(tensor.to(own.device, own.dtype), own):
            raise ValueError(
                f"the PEFT adapter holds {name}'s base {what} (save_embedding_layers), which is not this model's "
                f"{name}.{what}: load the base model the adapter was trained on (e.g. with its resized vocabulary)"
            )
    values = {name: _factors(kind, state, name, *linear_features(targets[name]), rank) for name in layers}
    # the saved modules' parameters and buffers (BatchNorm's running statistics), under every name
    params: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    params.update(model.named_buffers(remove_duplicate=False))
    names_of = _names_of_parameters(model)
    for name, tensor in saved.items():  # under the base model's own names
        if name not in params or params[name].shape != tensor.shape:
            raise ValueError(f"the PEFT adapter's {name} {tuple(tensor.shape)} does not fit this model")
        tied = [other for other in names_of.get(id(params[name]), ()) if other != name]
        # one tied weight saved under each of its names, unchanged between them (save_embedding_layers, as PEFT's
        # "auto" does after resize_token_embeddings) loads as one; a copy PEFT untied and trained does not
        one = all(other in saved and torch.equal(saved[other], tensor) for other in tied)
        if tied and not one and not meta.get("ensure_weight_tying"):
            raise ValueError(
                f"the PEFT adapter trained {name}, which this model ties to {tied[0]}: PEFT trained an untied copy; "
                "untie them first (e.g. give the output layer its own weight) to load it"
            )

    _adapt(model, config)
    adapted = tied_lora_layers(model)
    with torch.no_grad():
        for name, (A, B, u, v) in values.items():
            layer = adapted[name]
            for param, value in ((layer.shared.A, A), (layer.shared.B, B), (layer.lora_u, u), (layer.lora_v, v)):
                if value is not None:
                    assert param is not None, name  # (the config made from the file stores what it holds)
                    param.copy_(value)
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    return wrapped  # (the model as given: a wrapper looked through is kept)


def _read(directory) -> tuple[dict, dict]:
    """The adapter's config and tensors, with errors that say what the directory holds instead."""
    config, weights = (os.path.join(directory, name) for name in ("adapter_config.json", "adapter_model.safetensors"))
    if not os.path.isfile(config):
        raise FileNotFoundError(
            f"no adapter_config.json in {directory} (PEFT saves a non-default adapter in a subfolder of its name)"
        )
    meta = read_json(config)
    if str(meta.get("format", "")).startswith("tied_lora_kernels"):
        raise ValueError(f"{directory} holds a tied_lora_kernels adapter: load it with load_tied_lora")
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            f"no adapter_model.safetensors in {directory}: an adapter_model.bin must be loaded with PEFT and saved "
            "again with safe_serialization=True"
        )
    return meta, read_weights(weights)


def _factors(kind: str, state: dict, name: str, in_features: int, out_features: int, rank: int) -> tuple:
    """``(A, B, u, v)`` of layer ``name`` from the PEFT file (None: frozen at one), shapes checked."""
    key = _PREFIX + name
    needed = [key + end for end in (_LORA if kind == "LORA" else _VERA) if key + end not in state]
    if needed:
        raise ValueError(f"the PEFT adapter file lacks {needed[0]}")
    if kind == "LORA":
        A, B = state[key + ".lora_A.weight"], state[key + ".lora_B.weight"]
        u = v = None
    else:
        vera_A, vera_B = state["base_model.vera_A"], state["base_model.vera_B"]
        if vera_A.shape[1] < in_features or vera_B.shape[0] < out_features:
            raise ValueError(f"{name}: PEFT's vera_A/vera_B are too small for a [{out_features}, {in_features}] layer")
        A, B = vera_A[:, :in_features], vera_B[:out_features, :]
        u, v = state[key + ".vera_lambda_d"], state[key + ".vera_lambda_b"]
    for what, t, shape in (("A", A, (rank, in_features)), ("B", B, (out_features, rank))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: the PEFT adapter's {what} is {tuple(t.shape)}, this layer needs {shape}")
    for what, t, n in (("u", u, rank), ("v", v, out_features)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name}: the PEFT adapter's {what} is {tuple(t.shape)}, this layer needs ({n},)")
    return A, B, u, v
