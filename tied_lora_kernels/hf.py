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

import inspect
import json
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tied_lora_kernels.layer import TiedLoRALinear
from tied_lora_kernels.model import _adapter_params, _refuse_peft_inside, _unwrapped, tied_lora_layers
from tied_lora_kernels.save_load import CHECKPOINT_SUBFOLDER, CONFIG_NAME, FORMAT, load_tied_lora, save_tied_lora

__all__ = ["SaveTiedLoRACallback", "TiedLoRATrainer"]


class _TrainingCheck(TrainerCallback):
    """Refuse a run in which the adapter would not train when it begins (``_check_trains``: after ``Trainer`` has
    patched the model, with Liger for one), and warn once, at the first optimizer step, about trainable adapter
    tensors that got no gradient (``_warn_ungraded``); part of ``SaveTiedLoRACallback`` and of
    ``TiedLoRATrainer``."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.checked = False
        if model is not None and self._checks():
            _check_trains(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not getattr(self, "checked", True) and model is not None and self._checks():
            _warn_ungraded(args, model)
        self.checked = True

    def _checks(self) -> bool:
        return True


class SaveTiedLoRACallback(_TrainingCheck):
    """Save the adapter into each checkpoint ``Trainer`` writes (``{output_dir}/checkpoint-{step}/tied_lora``),
    to ``{output_dir}/adapter-{step}`` every ``every`` steps (None: never) and to ``{output_dir}/adapter-final``
    when training ends; only the main process writes. Refuses at the start of training a run in which the
    adapter would not train (``_check_trains``: PEFT in the model, an adapted output layer behind TRL's fused LM
    head), and warns at the first optimizer step about adapter tensors that got no gradient (``_warn_ungraded``)."""

    def __init__(self, every: int | None = None):
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every <= 0):
            raise ValueError(f"every must be a positive int or None, got {every!r}")
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
        # Trainer has just written this checkpoint (under a hyperparameter search, elsewhere: then skipped)
        checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not self.checkpoints_hold_adapter and os.path.isdir(os.path.join(args.output_dir, checkpoint)):
            self._save(args, state, model, os.path.join(checkpoint, CHECKPOINT_SUBFOLDER))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._save(args, state, model, "adapter-final")

    @staticmethod
    def _save(args, state, model, name: str) -> None:
        if state.is_world_process_zero:
            save_tied_lora(model, os.path.join(args.output_dir, name))


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
    be read as PEFT's: push ``export_peft_lora``'s folder instead). Refused when training starts, as by
    ``SaveTiedLoRACallback``: a run in which the adapter would not train (``_check_trains``); warns as it does
    about adapter tensors without a gradient at the first optimizer step.

    Another ``Trainer`` subclass (TRL's ``SFTTrainer``, ``DPOTrainer``, ...) gets these checkpoints by coming second:
    ``class TiedSFTTrainer(TiedLoRATrainer, SFTTrainer): pass``."""

    def __init__(self, *args, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if getattr(training_args, "push_to_hub", False):  # (before Trainer's init, which creates the Hub repo)
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


def _check_trains(model: nn.Module) -> None:
    """Refuse, before the first step, a run in which the adapter would not train: PEFT in the model (a trainer's
    ``peft_config``), or an adapted output layer that the model's forward bypasses — TRL's trainers patch it with
    a fused LM head (a ``fused_lm_head`` argument) that reads ``lm_head.weight`` itself, and so does Liger's fused
    linear cross entropy (a forward from ``liger_kernel``), so the adapter there gets no gradient, while
    ``generate`` still runs it."""
    model = _unwrapped(model)
    if not tied_lora_layers(model):
        return
    _refuse_peft_inside(model)
    output_layer: Any = getattr(model, "get_output_embeddings", None)  # (a PreTrainedModel's)
    try:
        head = output_layer() if callable(output_layer) else None
    except NotImplementedError:
        head = None
    if not isinstance(head, TiedLoRALinear):
        return
    forward = getattr(model.forward, "__func__", model.forward)
    if "fused_lm_head" in inspect.signature(model.forward, follow_wrapped=False).parameters:
        patched_by = "TRL's fused LM head (TRL's trainers patch it in)"
    elif getattr(forward, "__module__", "").startswith("liger_kernel."):
        patched_by = "Liger's fused linear cross entropy (use_liger_kernel=True)"
    else:
        return
    raise ValueError(
        f"the output layer is adapted, but this model's forward computes the training loss with {patched_by}, "
        "which reads the layer's weight without calling it: that adapter would get no gradient. Leave the output "
        "layer out of target_modules, or train it in full with modules_to_save"
    )


def _warn_ungraded(args, model: nn.Module) -> None:
    """Warn about the trainable adapter tensors that have no gradient at the first optimizer step: their layers were
    not called — no token reached an expert yet, or the model (or the trainer) reads the layers' weights without
    calling them, so that those adapters do nothing. Skipped where gradients are sharded away (DeepSpeed, FSDP)."""
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        return
    model = _unwrapped(model)
    ids = _adapter_params(tied_lora_layers(model))
    ungraded = [n for n, p in model.named_parameters() if id(p) in ids and p.requires_grad and p.grad is None]
    if ungraded:
        warnings.warn(
            f"{len(ungraded)} trainable adapter tensors got no gradient in the first optimizer step ({ungraded[:4]}"
            f"{', ...' if len(ungraded) > 4 else ''}): their layers were not called. In a mixture of experts no token "
            "may have reached an expert yet; otherwise the model or the trainer reads those layers' weights without "
            "calling them (a fused loss that takes lm_head.weight, fused-QKV code that concatenates weights, ...), "
            "so training leaves their adapters out: leave them out of target_modules",
            stacklevel=2,
        )


def _holds_adapter(directory: str) -> bool:
    """Whether ``directory`` holds a ``save_tied_lora`` adapter."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("format") == FORMAT
