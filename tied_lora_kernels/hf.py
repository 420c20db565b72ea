"""Hugging Face ``Trainer`` support (imports transformers; not imported by ``tied_lora_kernels`` itself).

``Trainer``'s own checkpoints work with an adapted Hugging Face model (a ``PreTrainedModel``) and resume
(``train(resume_from_checkpoint=...)``): ``save_pretrained`` stores each tied tensor once
(``TiedLoRALinear._tied_weights_keys``) and loading fills in their other names. Those checkpoints hold the
whole model, as for any model that is not a ``PeftModel``. ``TiedLoRATrainer`` writes checkpoints that hold
the adapter alone instead (with the optimizer, scheduler and trainer state, as PEFT's do) and resumes from them.
``SaveTiedLoRACallback`` adds the adapter alone (``save_tied_lora``: a few MB, loaded with ``load_tied_lora``) to
every checkpoint Trainer writes, in a ``tied_lora/`` subfolder (its ``adapter_config.json`` beside ``config.json``
would make ``from_pretrained`` take the checkpoint for a PEFT adapter), to ``{output_dir}/adapter-{step}`` every
``every`` optimizer steps if asked (e.g. with ``save_strategy="no"``), and to ``{output_dir}/adapter-final`` when
training ends::

    Trainer(model=model, args=TrainingArguments("out", save_steps=500), ...,
            callbacks=[SaveTiedLoRACallback()]).train()
    # out/checkpoint-500/ (resumable; load_tied_lora(model, "out/checkpoint-500/tied_lora")), ...,
    # out/adapter-final/

    TiedLoRATrainer(model=model, args=TrainingArguments("out", save_steps=500), ...).train()
    # out/checkpoint-500/: the adapter (load_tied_lora(model, "out/checkpoint-500")), optimizer and trainer state
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tied_lora_kernels.functional import first_names, shown
from tied_lora_kernels.layer import TiedLoRALinear
from tied_lora_kernels.model import (
    _adapter_parameters,
    _adapter_params,
    _refuse_inner_compile_wrappers,
    _refuse_peft_inside,
    _unwrapped,
    tied_lora_layers,
)
from tied_lora_kernels.save_load import (
    CHECKPOINT_SUBFOLDER,
    CONFIG_NAME,
    FORMAT,
    _saver,
    _write_on_rank0,
    load_tied_lora,
    save_tied_lora,
)

__all__ = ["SaveTiedLoRACallback", "TiedLoRATrainer"]


class _TrainingCheck(TrainerCallback):
    """Checks that the adapter trains, for ``SaveTiedLoRACallback`` and ``TiedLoRATrainer``: a run with PEFT in
    the model, merged adapters, or nothing trainable at all is refused when it begins; at the first optimizer step
    (before any update), an adapted output layer whose own trainable tensors got no gradient stops the run (a fused
    loss reads ``lm_head.weight``: TRL's fused LM head, Liger's fused linear cross entropy); and trainable adapter
    tensors that get no gradient in any of the first ``WATCHED_STEPS`` optimizer steps are named in a warning
    (their layers were not called). Gradients, not the patched code, are what is checked: they are exact whatever
    wraps the forward. A step at which no trainable parameter holds a gradient (an optimizer that steps inside the
    backward) is not looked at. A run that saves checkpoints of a model with parts replaced by their
    ``torch.compile`` wrappers is refused when it begins, rather than at its first checkpoint."""

    WATCHED_STEPS = 10
    ungraded: set[str] | None  # the tensors without a gradient so far (None: not looked at yet)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.ungraded = None
        self.steps = 0
        model = _unwrapped(model) if model is not None else None
        layers = tied_lora_layers(model) if model is not None and self._checks() else {}
        if layers:
            _refuse_peft_inside(model)
            _refuse_a_model_that_cannot_train(model, layers)
            if not hasattr(TrainerCallback, "on_pre_optimizer_step"):
                warnings.warn(
                    "this transformers has no on_pre_optimizer_step event (it came in 4.45): the checks that the "
                    "adapter's tensors get gradients (an adapted output layer a fused loss skips, layers never "
                    "called) do not run; upgrade transformers for them",
                    stacklevel=2,
                )
            if getattr(args.save_strategy, "value", args.save_strategy) != "no":  # (not at the first checkpoint)
                _refuse_inner_compile_wrappers(model, "saving checkpoints of")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        ungraded = getattr(self, "ungraded", set())  # (a callback added after on_train_begin checks nothing)
        if model is None or not self._checks() or (ungraded is not None and not ungraded) or _sharded(args):
            return
        model = _unwrapped(model)
        if not any(p.grad is not None for p in model.parameters() if p.requires_grad):
            return  # an optimizer that steps in the backward and clears the gradients (GaLore's layerwise, LOMO)
        now = _ungraded(model)
        if ungraded is None:  # the first step
            _refuse_an_ungraded_head(model, now)
            ungraded = set(now)
        self.ungraded = ungraded & now.keys()
        self.steps += 1
        if self.steps == self.WATCHED_STEPS:
            self._warn()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if getattr(self, "steps", 0) < self.WATCHED_STEPS:  # (a run shorter than the watch)
            self._warn()

    def _warn(self) -> None:
        ungraded = sorted(getattr(self, "ungraded", None) or ())
        if ungraded:
            warnings.warn(
                f"{len(ungraded)} trainable adapter tensors got no gradient in any of the first {self.steps} "
                f"optimizer steps ({first_names(ungraded, 4)}): their layers were not "
                "called. In a mixture of experts no token may have reached those experts; otherwise the model or "
                "the trainer reads those layers' weights without calling them (a fused loss that takes "
                "lm_head.weight, fused-QKV code that concatenates weights, ...), so training leaves their adapters "
                "out: leave them out of target_modules",
                stacklevel=2,
            )
        self.ungraded = set()

    def _checks(self) -> bool:
        return True


class SaveTiedLoRACallback(_TrainingCheck):
    """Save the adapter into each checkpoint ``Trainer`` writes (``{output_dir}/checkpoint-{step}/tied_lora``),
    to ``{output_dir}/adapter-{step}`` every ``every`` steps (None: never) and to ``{output_dir}/adapter-final``
    when training ends; only the main process writes. Checks that the adapter trains (``_TrainingCheck``)."""

    def __init__(self, every: int | None = None):
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every <= 0):
            raise ValueError(f"every must be a positive int or None, got {shown(every)}")
        self.every = every
        self.checkpoints_hold_adapter = False  # set by TiedLoRATrainer: its checkpoints are the adapter

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        saves = str(getattr(args.save_strategy, "value", args.save_strategy)) != "no"
        if self.checkpoints_hold_adapter:
            return
        if saves and model is not None and not isinstance(_unwrapped(model), PreTrainedModel):
            raise ValueError(
                f"Trainer saves a {type(_unwrapped(model)).__name__}, which is not a PreTrainedModel, as a plain "
                "safetensors state dict, which refuses the tensors Tied-LoRA shares between layers: train with "
                "TiedLoRATrainer, whose checkpoints hold the adapter alone, or set TrainingArguments(save_strategy="
                "'no') and let SaveTiedLoRACallback(every=...) save the adapter"
            )

    def _checks(self) -> bool:
        return not self.checkpoints_hold_adapter  # (TiedLoRATrainer, which checks on its own)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every is not None and state.global_step % self.every == 0:
            self._save(args, state, model, f"adapter-{state.global_step}")

    def on_save(self, args, state, control, model=None, **kwargs):
        # Trainer has just written this checkpoint (under a hyperparameter search, in a run folder of its own: then
        # skipped). Every process takes the same branch, decided by what they all share (the saving gathers shards,
        # a collective), not by whether a process sees the folder yet
        if not self.checkpoints_hold_adapter and not state.is_hyper_param_search:
            checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            self._save(args, state, model, os.path.join(checkpoint, CHECKPOINT_SUBFOLDER))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        super().on_train_end(args, state, control, model=model, **kwargs)
        self._save(args, state, model, "adapter-final")

    @staticmethod
    def _save(args, state, model, name: str) -> None:
        # on every process (tensors that FSDP2 sharded are gathered: a collective); the main process writes. Under
        # torch.distributed every process returns once rank 0 has written, or raises if it failed (as
        # save_tied_lora(gather=True)): none trains on past a failed save, nor waits in its next collective
        directory = os.path.join(args.output_dir, name)
        _write_on_rank0(True, _saver(model, directory, gather=True), directory, main=state.is_world_process_zero)


class TiedLoRATrainer(Trainer):
    """A ``transformers.Trainer`` whose checkpoints hold the adapter alone, as a PEFT model's do: each
    ``checkpoint-N/`` gets ``save_tied_lora``'s two files (a few MB, where the whole model is ~13 GB at 7B in bf16)
    beside the optimizer, scheduler, RNG and trainer state Trainer writes, and ``train(resume_from_checkpoint=...)``
    loads the adapter back into the adapted model (``load_tied_lora``); ``save_model`` saves the adapter too, and
    ``load_best_model_at_end`` loads the best checkpoint's. Any adapted model, a ``PreTrainedModel`` or not. Load
    a checkpoint elsewhere with ``load_tied_lora(base_model, "out/checkpoint-N")``.

    It overrides three of ``Trainer``'s private methods (``_save``, ``_load_from_checkpoint``, ``_load_best_model``;
    the ones PEFT's support sits in), tested with the installed transformers; a checkpoint that holds no adapter
    (e.g. written by a plain ``Trainer``) resumes through ``Trainer``'s own code. A ``SaveTiedLoRACallback`` still
    writes its ``adapter-N/`` snapshots and ``adapter-final/`` during ``train()``, and no ``tied_lora/`` subfolder
    (the checkpoint is the adapter). Refused when built: FSDP, DeepSpeed or tensor-parallel loading (the adapter
    would be saved from sharded parameters; untested) and ``push_to_hub`` (the pushed ``adapter_config.json`` would
    be read as PEFT's: push ``export_peft_lora``'s folder instead). Checks that the adapter trains, as
    ``SaveTiedLoRACallback`` does (``_TrainingCheck``).

    Another ``Trainer`` subclass (TRL's ``SFTTrainer``, ``DPOTrainer``, ...) gets these checkpoints by coming second:
    ``class TiedSFTTrainer(TiedLoRATrainer, SFTTrainer): pass``."""

    def __init__(self, *args, **kwargs):
        # by type, wherever it comes: Trainer takes it second, TRL's DPOTrainer and GRPOTrainer third
        training_args = next((a for a in (*args, *kwargs.values()) if isinstance(a, TrainingArguments)), None)
        if training_args is not None and training_args.push_to_hub is True:  # (before Trainer's init: Hub repo)
            raise ValueError(
                "TiedLoRATrainer does not push to the Hub: its checkpoints' adapter_config.json would be read as "
                "PEFT's; push the folder export_peft_lora(model, ...) writes instead"
            )
        super().__init__(*args, **kwargs)
        self.add_callback(_TrainingCheck())
        sharded = [
            name
            for name in ("is_fsdp_enabled", "is_deepspeed_enabled", "is_distributed_loading_by_transformers")
            if getattr(self, name, False)
        ]
        if sharded:
            raise ValueError(
                f"TiedLoRATrainer saves the adapter from the model's own parameters, which are sharded here "
                f"({sharded[0]}); use Trainer with SaveTiedLoRACallback (also untested with sharding)"
            )

    def train(self, *args, **kwargs):
        # while it trains, SaveTiedLoRACallback knows each checkpoint is the adapter already (and that a model
        # which is not a PreTrainedModel saves fine); the callback is left as it was for another trainer
        marked = [
            c
            for c in self.callback_handler.callbacks
            if isinstance(c, SaveTiedLoRACallback) and not c.checkpoints_hold_adapter
        ]
        for callback in marked:
            callback.checkpoints_hold_adapter = True
        try:
            return super().train(*args, **kwargs)
        finally:
            for callback in marked:
                callback.checkpoints_hold_adapter = False

    def _adapted(self) -> nn.Module:
        model = self.model
        if model is None or not tied_lora_layers(_unwrapped(model)):
            raise ValueError(
                "TiedLoRATrainer saves and loads the adapter alone, but this model has no Tied-LoRA adapter"
            )
        return model

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        directory = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save or directory is None:
            return
        save_tied_lora(self._adapted(), directory)
        processor = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        if processor is None:  # (as Trainer: the data collator's tokenizer)
            processor = getattr(self.data_collator, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(directory)
        torch.save(self.args, os.path.join(directory, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not _holds_adapter(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        load_tied_lora(model if model is not None else self._adapted(), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not _holds_adapter(best):
            super()._load_best_model()
            return
        load_tied_lora(self._adapted(), best)


def _sharded(args) -> bool:
    """Whether the gradients may live elsewhere than ``.grad`` of the model's parameters: DeepSpeed, FSDP (FSDP1's
    flat parameters; FSDP2's too, untested), set in the arguments or through accelerate."""
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        return True
    from accelerate.state import AcceleratorState  # (Trainer's own dependency)

    kind = str(AcceleratorState._shared_state.get("distributed_type", ""))
    return "DEEPSPEED" in kind or "FSDP" in kind


def _ungraded(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable adapter tensors without a gradient, each by its first name."""
    ids = _adapter_params(tied_lora_layers(model))
    return {n: p for n, p in model.named_parameters() if id(p) in ids and p.requires_grad and p.grad is None}


def _refuse_an_ungraded_head(model: nn.Module, ungraded: dict[str, nn.Parameter]) -> None:
    """Stop the run at its first optimizer step when the output layer is adapted and none of its own trainable
    tensors (those no other layer shares) got a gradient: the loss reads its weight without calling it. Every
    batch calls the output layer of a model whose loss uses it, so this cannot be a routed expert's silence."""
    output_layer: Any = getattr(model, "get_output_embeddings", None)  # (a PreTrainedModel's)
    try:
        head = output_layer() if callable(output_layer) else None
    except NotImplementedError:
        head = None
    if not isinstance(head, TiedLoRALinear):
        return
    others = {
        id(p) for layer in tied_lora_layers(model).values() if layer is not head for p in _adapter_parameters(layer)
    }
    own = {id(p) for p in _adapter_parameters(head) if p is not None and p.requires_grad and id(p) not in others}
    if own and own <= {id(p) for p in ungraded.values()}:
        raise ValueError(
            "the output layer is adapted, but its adapter got no gradient in the first step: the training loss reads "
            "the layer's weight without calling it (TRL's trainers' fused LM head; Liger's fused linear cross "
            "entropy, use_liger_kernel=True), so the adapter would never train. Stopped before the first update: "
            "leave the output layer out of target_modules, or train it in full with modules_to_save (with Liger in a "
            "plain Trainer, liger_kernel_config={'fused_linear_cross_entropy': False} also keeps the adapter "
            "trainable; TRL's own fused head stays on)"
        )


def _refuse_a_model_that_cannot_train(model: nn.Module, layers: dict[str, TiedLoRALinear]) -> None:
    """Refuse, when a run begins, merged adapters (a merged layer computes with ``weight`` alone: its adapter gets no
    gradient) and a model with no parameter that requires grad (its adapter frozen): either way the first backward
    would fail with PyTorch's "element 0 of tensors does not require grad", which names neither cause."""
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"{len(merged)} adapted layers are merged ({first_names(merged, 3)}): a merged "
            "adapter does not train; unmerge_tied_lora(model) before training"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "no parameter of this model requires grad: its Tied-LoRA adapter is frozen (loaded with "
            "load_tied_lora(..., trainable=False), or requires_grad turned off), so there is nothing to train; "
            "load it with trainable=True"
        )


def _holds_adapter(directory: str) -> bool:
    """Whether ``directory`` holds a ``save_tied_lora`` adapter."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError:  # (not ours: Trainer's own loading says what is wrong with it)
            return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT
