"""Saving and loading the adapter: each shared ``A``/``B`` stored once in a safetensors file, and a JSON file with
the config and the layout (each adapted layer's shapes, rank, ties and trained factors) it must fit.

``save_tied_lora`` writes ``adapter_model.safetensors`` and ``adapter_config.json``; ``load_tied_lora`` adapts a
bare model with the saved config or loads into an adapted one of the same layout, after checking everything
before touching the model; ``tied_lora_state_dict`` is the tensors themselves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Set

import torch
from torch import nn

from tied_lora_kernels.base_layers import adaptable_types, linear_features
from tied_lora_kernels.config import TiedLoRAConfig
from tied_lora_kernels.functional import BACKENDS, check_backend_rank, first_names
from tied_lora_kernels.kernels.configs import MAX_RANK
from tied_lora_kernels.model import (
    _adapt,
    _adapter_parameters,
    _adapter_params,
    _is_adapter_tensor,
    _refuse_distributed,
    _refuse_inner_compile_wrappers,
    _refuse_parametrized,
    _refuse_peft_inside,
    _require_layers,
    _sharded,
    _undone_on_error,
    _unwrapped,
    tied_lora_layers,
)
from tied_lora_kernels.targets import (
    _find_targets,
    _input_dtype,
    _named_tensors,
    _read_by_parent,
    _saved_ids,
    _saved_modules,
    _saved_tensor_ids,
)

__all__ = ["save_tied_lora", "load_tied_lora", "tied_lora_state_dict"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "tied_lora_kernels/1"
CHECKPOINT_SUBFOLDER = "tied_lora"
"""Where in a ``Trainer`` checkpoint ``SaveTiedLoRACallback`` puts the adapter (hf.py)."""


def tied_lora_state_dict(model: nn.Module, *, gather: bool = False) -> dict[str, torch.Tensor]:
    """Every adapter tensor once (tied ones under the first name PyTorch gives them) and those of the config's
    ``modules_to_save`` (with their persistent buffers; also those of parts adapted apart inside a model with no
    config), detached; names are relative to the model inside a ``torch.compile``, (Distributed)DataParallel or
    ``AveragedModel`` wrapper.

    Tensors sharded by FSDP2 (DTensors, e.g. a ``modules_to_save`` head sharded with the base model) are refused by
    name; ``gather=True`` gathers them whole instead, a collective: every rank of their mesh must make the call.
    """
    if not isinstance(gather, bool):
        raise TypeError(f"gather must be True or False, got {gather!r}")
    state = _state(model)
    sharded = _sharded(state.items())
    if sharded and not gather:  # (each rank holds a shard: saving, exporting or loading would crash in safetensors)
        raise ValueError(
            f"{sharded[:3]} are sharded (DTensors: each rank holds a shard). Gather them with gather=True on every "
            "rank (save_tied_lora and export_peft_lora take it too, and write on rank 0 alone), or leave them whole "
            "on every rank: pass set(tied_lora_parameters(model)) as ignored_params to every fully_shard call, with "
            "the parameters of the modules_to_save added (sync_tied_lora_grads then averages them too)"
        )
    for name in sharded:  # (DTensors, in the same order on every rank: each is one all-gather)
        state[name] = state[name].full_tensor()  # type: ignore[attr-defined]
    return state


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``tied_lora_state_dict``'s tensors, as they are (DTensors sharded)."""
    model = _unwrapped(model)
    layers = _require_layers(model)
    _refuse_parametrized(layers)
    _refuse_inner_compile_wrappers(model, "taking the adapter of")
    ids = _adapter_params(layers) | _saved_ids(model)  # (modules_to_save: trained in full)
    return {name: t.detach() for name, t in _named_tensors(model).items() if id(t) in ids}


def _write_on_rank0(
    gather: bool, write: Callable[[], None], directory: str | os.PathLike, *, main: bool = True
) -> None:
    """Call ``write``. With ``gather=True`` under torch.distributed (every rank calls) rank 0 alone calls it, and
    every rank returns once it has written or raises if it failed (rank 0 its own error): no rank reads the files
    before they are there, nor trains on past a save that failed. Otherwise it is called where ``main`` (a caller
    that knows its main process without a process group: ``Trainer``'s ``is_world_process_zero``)."""
    import torch.distributed as dist

    if not (gather and dist.is_available() and dist.is_initialized()):  # (not a collective call)
        if main:
            write()
        return
    error = None
    if dist.get_rank() == 0:
        try:
            write()
        except Exception as e:  # noqa: BLE001 (told to every rank below, then raised)
            error = e
    outcome = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise RuntimeError(f"rank 0 failed to write {os.fspath(directory)!r}: {outcome[0]}")


def _refuse_meta(state: dict[str, torch.Tensor], doing: str) -> dict[str, torch.Tensor]:
    """``state`` (``tied_lora_state_dict``'s), refused if a tensor is on the meta device (no values to write)."""
    on_meta = [k for k, v in state.items() if v.is_meta]
    if on_meta:
        raise ValueError(
            f"{on_meta[:3]} are on the meta device (a model built under init_empty_weights or device='meta', or "
            f"offloaded): materialise the model and load its adapter before {doing}"
        )
    return state


def _layout(model: nn.Module) -> dict[str, dict]:
    """What an adapter file must match: each adapted layer's shapes and where its shared pair lives."""
    layers = tied_lora_layers(model)
    shared_names: dict[int, str] = {}
    for name, p in model.named_parameters():
        shared_names.setdefault(id(p), name.rpartition(".")[0])
    return {
        name: {
            "in_features": int(layer.in_features),  # (plain ints for JSON: nn.Linear keeps a numpy int as given)
            "out_features": int(layer.out_features),
            "rank": layer.rank,
            "alpha": layer.alpha,
            "trains": [
                k for k, p in zip("ABuv", _adapter_parameters(layer), strict=True) if p is not None and p.requires_grad
            ],
            "shared": shared_names[id(layer.shared.A)],
            "b_rows": list(layer.b_rows) if layer.b_rows else None,
        }
        for name, layer in layers.items()
    }


def save_tied_lora(model: nn.Module, directory: str | os.PathLike, *, gather: bool = False) -> None:
    """Write ``adapter_model.safetensors`` (each tensor once) and ``adapter_config.json`` to ``directory``
    (from the model inside a ``torch.compile``, (Distributed)DataParallel or ``AveragedModel`` wrapper).

    ``gather=True`` (FSDP2 with tensors of the adapter or of ``modules_to_save`` sharded): every rank calls it, the
    shards are gathered (``tied_lora_state_dict``) and rank 0 alone writes; every rank returns once it has written
    (or raises if it failed). Refused (naming why), before writing: a model without adapters, one holding PEFT, a
    part adapted by an ``apply_tied_lora`` call of its own (the file's one config would not describe it), a
    targeted layer replaced since ``apply_tied_lora``, shards without ``gather=True``, meta tensors."""
    _write_on_rank0(gather, _saver(model, directory, gather=gather), directory)


def _saver(model: nn.Module, directory: str | os.PathLike, *, gather: bool) -> Callable[[], None]:
    """``save_tied_lora``'s checks and gathering (on every process, a collective if ``gather`` finds shards), and the
    writing of the files, returned to be called where they are written."""
    from safetensors.torch import save_file

    model = _unwrapped(model)
    state = _refuse_meta(tied_lora_state_dict(model, gather=gather), "saving")  # (refuses a bare model)
    _refuse_peft_inside(model)
    config = getattr(model, "tied_lora_config", None)
    nested = [
        name
        for name, module in model.named_modules()
        if name and getattr(module, "tied_lora_config", config) is not config and tied_lora_layers(module)
    ]  # (a wrapper such as FSDP1's forwards the wrapped model's attributes: its config is the same object)
    if config is not None and nested:  # the file holds one config: loading would adapt only what it targets
        raise ValueError(
            f"{nested[0]!r} was adapted by an apply_tied_lora call of its own, which this model's config does not "
            f"describe: save it apart (save_tied_lora(model.get_submodule({nested[0]!r}), ...)) or adapt the model "
            "in one call"
        )
    left = sorted(_find_targets(model, config, adapted=True)) if config is not None else []
    if left:  # a layer replaced after apply_tied_lora: its adapter is gone, and loading would adapt it again
        raise ValueError(
            f"{left[:4]} match this adapter's target_modules but carry no adapter: replaced after apply_tied_lora "
            "(by resize_token_embeddings, dequantize(), ...)? Their adapter is gone, and no model could load this "
            "file. Make such changes before apply_tied_lora"
        )
    dtypes = {str(v.dtype).removeprefix("torch.") for k, v in state.items() if _is_adapter_tensor(k)}
    config = config.to_dict() if config is not None else None
    if config is not None and len(dtypes) == 1:  # the adapters as they are now (e.g. after model.to(bf16))
        config["dtype"] = dtypes.pop()
    meta = {
        "format": FORMAT,
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()
        },
        "config": config,
        "layout": _layout(model),
        # (beside the layout, which an adapted model must match: a reader before it ignores it)
        "layer_dropout": {name: layer.lora_dropout for name, layer in tied_lora_layers(model).items()},
    }
    text = json.dumps(meta, indent=2)  # before either file is written: an error leaves the folder as it was

    def write() -> None:
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.contiguous().cpu() for k, v in state.items()}
        save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            f.write(text)

    return write


def load_tied_lora(
    model: nn.Module, directory: str | os.PathLike, *, backend: str | None = None, trainable: bool | None = None
) -> nn.Module:
    """Load an adapter saved by ``save_tied_lora``; ``backend`` overrides the saved one. ``trainable``: None keeps
    the flags (a bare model's adapter trains what its config trains, so that training continues; an adapted
    model keeps its own); False freezes the loaded tensors (for inference: PEFT's ``is_trainable=False``, its
    default); True makes the config's trained factors and ``modules_to_save`` require grad again (a model whose
    layers were built by hand has no config: the factors that trained when the file was saved).

    A model without adapters is adapted first with the saved config (same targets, groups, flags; each layer's
    alpha and dropout as saved); an adapted one must have the same layout (layers, shapes, rank, alpha, ties),
    adapter dtypes the file's values convert to exactly and the same configured trained factors, and keeps its own
    dropout and ``requires_grad`` flags (which factors require grad right now is not compared:
    freezing a model for inference must not stop it loading). Every check runs before the model is touched:
    a mismatch raises and leaves the model as it was. A ``torch.compile``, (Distributed)DataParallel or
    ``AveragedModel`` wrapper is looked through (and returned: the model as given); a bare model inside
    ``DistributedDataParallel`` is refused (adapt it before wrapping: DDP would not average the new parameters).
    """
    wrapped, model = model, _unwrapped(model)
    _refuse_inner_compile_wrappers(model, "loading an adapter into")
    if trainable is not None and not isinstance(trainable, bool):
        raise TypeError(f"trainable must be True, False or None, got {trainable!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and any(layer.quantized for layer in tied_lora_layers(model).values()):
        raise ValueError("backend='triton' needs plain weights; this model's adapted layers include quantized ones")
    if backend == "triton":  # (as a layer or config built with it refuses it; a bare model's config does below)
        for adapted in tied_lora_layers(model).values():
            check_backend_rank(backend, adapted.rank)

    meta = _read_meta(directory)
    layout, listed = meta["layout"], set(meta["tensors"])
    state = read_weights(os.path.join(directory, WEIGHTS_NAME))
    layers = tied_lora_layers(model)
    if layers:
        merged = [name for name, layer in layers.items() if layer.merged]
        if merged:
            raise RuntimeError(f"cannot load into merged layers ({merged[:3]}...): unmerge_tied_lora(model) first")
        ours, theirs = _fit(_layout(model)), _fit(layout)
        if ours != theirs:
            raise ValueError(f"the adapter in {directory} does not fit this model: {_describe_diff(ours, theirs)}")
        config = getattr(model, "tied_lora_config", None)
        if config is not None and meta["config"] is not None:  # what each config trains, whatever is frozen now
            # (the backend plays no part in what trains: "auto", whatever the file says)
            mine, saved = _trained(config), _trained(_saved_config(meta, layout, backend="auto"))
            if mine != saved:
                raise ValueError(
                    f"the adapter in {directory} does not fit this model: it was configured to train {saved}, "
                    f"this model's adapter {mine}"
                )
        absent = _check_state(state, model, listed)
    else:
        if meta["config"] is None:
            raise ValueError(
                f"the adapter in {directory} was saved without a config (from layers adapted by hand): adapt the "
                "model the same way first, then load"
            )
        _refuse_distributed(wrapped)
        _check_base_shapes(model, layout)
        config = _saved_config(meta, layout, backend)
        targets = _find_targets(model, config)
        if sorted(targets) != sorted(layout):
            extra, missing = sorted(set(targets) - set(layout)), sorted(set(layout) - set(targets))
            read = [n for n in missing if _read_by_parent(model, n)]  # (_check_base_shapes found each of them)
            why = (
                f"; {read[:4]} are layers whose weight their parent reads itself, which apply_tied_lora no longer "
                "adapts (targets._WEIGHT_READ_BY_PARENT: the adapter was skipped there on some paths)"
                if read
                else ""
            )
            found = [f"its targets also match {first_names(extra, 4)}"] if extra else []
            found += [f"its targets no longer match {first_names(missing, 4)}"] if missing else []
            raise ValueError(f"the adapter in {directory} does not fit this model: {'; '.join(found)}{why}")
        # the file must match its own description, and the description the config: then the adapter that
        # apply_tied_lora builds from the same config on the same targets is the one that was saved
        described = {k: (torch.Size(d["shape"]), getattr(torch, d["dtype"]), False) for k, d in meta["tensors"].items()}
        _check_tensors(state, described)
        if any(dtype != config.dtype for k, (_, dtype, _) in described.items() if _is_adapter_tensor(k)):
            raise TypeError(f"the adapter's tensors are not all {config.dtype}, its config's dtype")
        if any(model.get_submodule(name).weight.is_meta for name in layout):
            raise ValueError("the model is on the meta device: materialise it (to_empty) before loading")
        # the modules_to_save tensors load into the bare model's own parameters, under the names they will have
        # (tied_lora_state_dict's): the file must hold exactly those, in shapes and dtypes that load, before _adapt
        # adapts the model (_saved_modules refuses a module tied to one left out)
        ids = _saved_tensor_ids(_saved_modules(model, config, targets))
        own = {name: t for name, t in _named_tensors(model).items() if id(t) in ids}
        module_tensors = {k: t for k, t in state.items() if not _is_adapter_tensor(k)}
        absent = _check_against(
            module_tensors, {k: (t.shape, t.dtype, t.is_meta) for k, t in own.items()}, listed, model
        )
        if config.dtype.itemsize < 4 and any(_input_dtype(model.get_submodule(n)) != config.dtype for n in layout):
            # a 16-bit adapter file (saved after model.to(bf16)) onto layers that run in another dtype (a float32
            # model, fp16, a quantized base whose compute dtype differs or is not known yet): float32 adapters,
            # which run beside any input, holding exactly the saved values
            config = dataclasses.replace(config, dtype=torch.float32)
        # the file's tensors are checked against the adapter that apply_tied_lora builds: if they do not fit (a file
        # edited by hand, or written by another version), the model is put back as it was
        with _undone_on_error(model, layout):
            _adapt(model, config, shared_of={name: entry["shared"] for name, entry in layout.items()})
            # each layer's alpha and dropout as saved, set since apply or not. (A file written before it saved the
            # dropouts ran the config's alpha, whatever its layout recorded: an alpha set on a layer had no effect)
            for name, p in meta.get("layer_dropout", {}).items():
                layer = model.get_submodule(name)
                layer.alpha, layer.lora_dropout = layout[name]["alpha"], p
            _check_state(state, model, listed)
    if absent:
        warnings.warn(
            f"the adapter file holds no {absent[:3]} (saved before save_tied_lora saved the buffers of "
            "modules_to_save): the model keeps its own",
            stacklevel=2,
        )
    if backend is not None:
        for layer in tied_lora_layers(model).values():
            layer.backend = backend
    tensors = _named_tensors(model)
    with torch.no_grad():
        for name, tensor in state.items():
            tensors[name].copy_(tensor)
    if trainable is not None:
        trained = _trained_tensors(model, layout)
        for name in state:  # an adapter tensor trains if its factor is configured to; a saved module always
            if isinstance(tensors[name], nn.Parameter):  # (not a saved module's buffer)
                adapter = _is_adapter_tensor(name)
                tensors[name].requires_grad_(trainable and (not adapter or id(tensors[name]) in trained))
    return wrapped  # (the model as given: a wrapper looked through is kept)


def _trained_tensors(model: nn.Module, layout: dict[str, dict]) -> set[int]:
    """The ids of the adapter tensors configured to train: the factors the model's config trains or, for layers
    built by hand (no config), those of each layer that trained when the file was saved (its layout's "trains")."""
    config = getattr(model, "tied_lora_config", None)
    out = set()
    for name, layer in tied_lora_layers(model).items():
        kinds = _trained(config) if config is not None else layout[name]["trains"]
        out |= {id(p) for k, p in zip("ABuv", _adapter_parameters(layer), strict=True) if p is not None and k in kinds}
    return out


def _read_meta(directory: str | os.PathLike) -> dict:
    """An adapter file's ``adapter_config.json``; a folder that holds something else is refused, naming what it
    holds and where its adapter is."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory} is not a folder")
        if os.path.isfile(os.path.join(directory, CHECKPOINT_SUBFOLDER, CONFIG_NAME)):
            raise FileNotFoundError(
                f"{directory} is a checkpoint of the whole model; SaveTiedLoRACallback saved its adapter in "
                f"{os.path.join(directory, CHECKPOINT_SUBFOLDER)}: load that"
            )
        if os.path.isfile(os.path.join(directory, "config.json")):
            raise FileNotFoundError(
                f"{directory} holds a whole model (save_pretrained, or Trainer.save_model of an adapted model), not "
                "an adapter: load it with from_pretrained, or save the adapter with save_tied_lora "
                "(SaveTiedLoRACallback writes {output_dir}/adapter-final; TiedLoRATrainer's save_model, the adapter)"
            )
        raise FileNotFoundError(f"{directory} holds no {CONFIG_NAME}: it is not a save_tied_lora adapter")
    meta = read_json(path)
    if meta.get("format") != FORMAT:
        if "peft_type" in meta:
            raise ValueError(
                f"{directory} is a PEFT adapter ({meta['peft_type']}): bring it over with "
                "load_peft_adapter(model, directory)"
            )
        raise ValueError(f"{directory} is not a tied_lora_kernels adapter (format {meta.get('format')!r})")
    _check_meta(meta, path)
    return meta


def read_json(path: str) -> dict:
    """An adapter's JSON config (this library's or PEFT's), refused naming the file if it is not a JSON object."""
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON ({e}): a damaged adapter") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds a JSON {type(meta).__name__}, not an adapter's config")
    return meta


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """An adapter's safetensors file, refused naming it if safetensors cannot read it (its own error names neither
    the file nor the problem: a file cut short, or not safetensors)."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except OSError:
        raise
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): a damaged adapter") from None


def _check_meta(meta: dict, path: str) -> None:
    """Refuse an ``adapter_config.json`` that lacks what loading reads (edited by hand, or cut short), naming it."""

    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: {what}; the file is damaged or was not written by save_tied_lora")

    for key, kinds in (("config", (dict, type(None))), ("layout", dict), ("tensors", dict)):
        if key not in meta or not isinstance(meta[key], kinds):
            raise bad(f"{key!r} is missing or not a JSON object")
    config = meta["config"]
    if config is not None:
        unknown = sorted(set(config) - {f.name for f in dataclasses.fields(TiedLoRAConfig) if f.init})
        if unknown:
            raise bad(f"its config has fields {unknown} this version does not know (written by a newer one?)")
        if "target_modules" not in config:
            raise bad("its config has no target_modules")
    for name, entry in meta["layout"].items():
        if not isinstance(entry, dict) or not {"in_features", "out_features", "shared"} <= set(entry):
            raise bad(f"the layout of {name!r} lacks in_features, out_features or shared")
    dropouts = meta.get("layer_dropout", {})
    if not isinstance(dropouts, dict) or not set(dropouts) <= set(meta["layout"]):
        raise bad("its layer_dropout is not a JSON object of the layout's layers")
    if dropouts and not all("alpha" in meta["layout"][name] for name in dropouts):
        raise bad("its layout lacks a layer's alpha")
    for name, d in meta["tensors"].items():
        dtype = getattr(torch, str(d.get("dtype")), None) if isinstance(d, dict) else None
        shape = d.get("shape") if isinstance(d, dict) else None
        sizes = isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)
        if not isinstance(dtype, torch.dtype) or not sizes:
            raise bad(f"tensor {name!r} has no shape or no dtype torch knows ({d!r})")


def _check_state(state: dict[str, torch.Tensor], model: nn.Module, listed: Set[str]) -> list[str]:
    """A file's tensors against the adapted ``model``'s (``_check_against``)."""
    current = _state(model)
    sharded = _sharded(current.items())
    if sharded:  # (their copy_ from a whole tensor would fail, after other tensors were written)
        raise ValueError(
            f"{sharded[:3]} are sharded (DTensors: each rank holds a shard): load the adapter into the model before "
            "fully_shard"
        )
    expected = {k: (t.shape, t.dtype, t.is_meta) for k, t in current.items()}
    return _check_against(state, expected, listed, model)


def _check_against(state: dict[str, torch.Tensor], expected: dict, listed: Set[str], model: nn.Module) -> list[str]:
    """``_check_tensors``, less the buffers of ``modules_to_save`` that a file saved before they were (version 0.1.0
    of 12-04 and earlier) neither holds nor describes (``listed``: the names its ``adapter_config.json`` describes):
    it loads, the model keeping its own. Returns those buffers' names, for the caller's warning."""
    buffers = {name for name, _ in model.named_buffers()}
    absent = sorted(k for k in expected if k in buffers and k not in state and k not in listed)
    _check_tensors(state, {k: v for k, v in expected.items() if k not in absent})
    return absent


def _saved_config(meta: dict, layout: dict[str, dict], backend: str | None = None) -> TiedLoRAConfig:
    """The config an adapter file was saved with (``backend`` overriding its own). A file that says
    ``backend="triton"`` at a rank above the kernels' largest (saved before configs refused that pairing, its
    layers switched to another backend once built) loads with ``"auto"``, which runs the torch path there, and a
    warning."""
    fields = dict(meta["config"])
    fields["target_modules"] = fields["target_modules"] or list(layout)  # None: a callable, not saved
    if backend is not None:
        fields["backend"] = backend
    elif fields.get("backend") == "triton" and isinstance(fields.get("rank"), int) and fields["rank"] > MAX_RANK:
        warnings.warn(
            f"the adapter's config says backend='triton' at rank {fields['rank']}, above the kernels' largest "
            f"({MAX_RANK}): loading it with backend='auto', which runs the torch path (pass backend= to choose)",
            stacklevel=3,
        )
        fields["backend"] = "auto"
    return TiedLoRAConfig(**fields)


def _trained(config: TiedLoRAConfig) -> list[str]:
    """The factors a config trains (its preset's, unless a flag overrides it)."""
    return [k for k in "ABuv" if config.resolved[f"train_{k}"]]


def _fit(layout: dict[str, dict]) -> dict[str, dict]:
    """What must match for an adapter to load into an adapted model: the layout less what trains."""
    return {name: {k: v for k, v in entry.items() if k != "trains"} for name, entry in layout.items()}


def _check_tensors(state: dict[str, torch.Tensor], expected: dict[str, tuple]) -> None:
    if set(state) != set(expected):
        differ = set(state) ^ set(expected)
        hint = ""
        if all(k.endswith((".lora_scale.u", ".lora_v")) for k in differ):
            # (a u or v frozen at one is no tensor at all: it is neither kept nor saved)
            hint = (
                " (only u and v differ: a frozen u or v is a tensor only when it does not start at one, so the "
                "file's train_u / train_v / u_init and this model's differ)"
            )
        raise ValueError(
            f"adapter tensors differ: missing {sorted(set(expected) - set(state))[:4]}, "
            f"unexpected {sorted(set(state) - set(expected))[:4]}{hint}"
        )
    for name, tensor in state.items():
        shape, dtype, is_meta = expected[name]
        if is_meta:
            raise ValueError(f"{name} is on the meta device: materialise the model (to_empty) before loading")
        if tensor.shape != shape:
            raise ValueError(f"{name}: saved shape {tuple(tensor.shape)}, model has {tuple(shape)}")
        if tensor.dtype != dtype and torch.promote_types(tensor.dtype, dtype) != dtype:  # widening is exact
            if _is_adapter_tensor(name):
                fix = "adapt with TiedLoRAConfig(dtype=...) matching the file"
                ours = f"the model's adapter is {dtype}"
            else:  # a modules_to_save tensor: the model's own parameter
                fix = "load into the model in the file's dtype, then convert it"
                ours = f"the model's is {dtype}"
            raise TypeError(f"{name}: saved as {tensor.dtype}, {ours}; loading would round it ({fix})")


def _check_base_shapes(model: nn.Module, layout: dict[str, dict]) -> None:
    modules = dict(model.named_modules())
    for name, entry in layout.items():
        m = modules.get(name)
        if m is None:
            raise ValueError(f"the adapter targets {name!r}, and this model has no module of that name")
        if not isinstance(m, adaptable_types()):
            kind = type(m).__name__
            raise ValueError(f"the adapter targets {name!r}: this model's module there is {kind}, not nn.Linear")
        if linear_features(m) != (entry["in_features"], entry["out_features"]):
            (k, n) = linear_features(m)
            raise ValueError(
                f"{name}: the adapter was saved for [{entry['out_features']}, {entry['in_features']}], "
                f"this model's layer is [{n}, {k}]"
            )


def _describe_diff(ours: dict, theirs: dict) -> str:
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    if missing or extra:
        return f"layers only in the adapter {missing[:4]}, only in the model {extra[:4]}"
    name = next(n for n in ours if ours[n] != theirs[n])
    key = next(k for k in {**ours[name], **theirs[name]} if ours[name].get(k) != theirs[name].get(k))
    return f"layer {name!r} has {key}={ours[name].get(key)!r}, the adapter {key}={theirs[name].get(key)!r}"
