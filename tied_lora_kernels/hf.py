"""Hugging Face ``Trainer`` support (imports transformers; not imported by ``tied_lora_kernels`` itself).

``Trainer``'s own checkpoints work with an adapted Hugging Face model (a ``PreTrainedModel``) and resume
(``train(resume_from_checkpoint=...)``): ``save_pretrained`` stores each tied tensor once
(``TiedLoRALinear._tied_weights_keys``) and loading fills in their other names. Those checkpoints hold the
whole model, as for any model that is not a ``PeftModel``. This callback adds the adapter alone
(``save_tied_lora``: a few MB, loaded with ``load_tied_lora``) to every checkpoint Trainer writes, in a
``tied_lora/`` subfolder (its ``adapter_config.json`` beside ``config.json`` would make ``from_pretrained`` take
the checkpoint for a PEFT adapter), to ``{output_dir}/adapter-{step}`` every ``every`` optimizer steps if asked
(e.g. with ``save_strategy="no"``), and to ``{output_dir}/adapter-final`` when training ends::

    Trainer(model=model, args=TrainingArguments("out", save_steps=500), ...,
            callbacks=[SaveTiedLoRACallback()]).train()
    # out/checkpoint-500/ (resumable; load_tied_lora(model, "out/checkpoint-500/tied_lora")), ...,
    # out/adapter-final/
"""

from __future__ import annotations

import os

from transformers import PreTrainedModel, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tied_lora_kernels.model import _unwrapped
from tied_lora_kernels.save_load import save_tied_lora

__all__ = ["SaveTiedLoRACallback"]


CHECKPOINT_SUBFOLDER = "tied_lora"
"""Where in a ``Trainer`` checkpoint the callback puts the adapter."""


class SaveTiedLoRACallback(TrainerCallback):
    """Save the adapter into each checkpoint ``Trainer`` writes (``{output_dir}/checkpoint-{step}/tied_lora``),
    to ``{output_dir}/adapter-{step}`` every ``every`` steps (None: never) and to ``{output_dir}/adapter-final``
    when training ends; only the main process writes."""

    def __init__(self, every: int | None = None):
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every <= 0):
            raise ValueError(f"every must be a positive int or None, got {every!r}")
        self.every = every

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        saves = str(getattr(args.save_strategy, "value", args.save_strategy)) != "no"
        if saves and model is not None and not isinstance(_unwrapped(model), PreTrainedModel):
            raise ValueError(
                f"Trainer saves a {type(_unwrapped(model)).__name__}, which is not a PreTrainedModel, as a plain "
                "safetensors state dict, which refuses the tensors Tied-LoRA shares between layers: set "
                "TrainingArguments(save_strategy='no') and let SaveTiedLoRACallback(every=...) save the adapter"
            )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every is not None and state.global_step % self.every == 0:
            self._save(args, state, model, f"adapter-{state.global_step}")

    def on_save(self, args, state, control, model=None, **kwargs):
        # Trainer has just written this checkpoint (under a hyperparameter search, elsewhere: then skipped)
        checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if os.path.isdir(os.path.join(args.output_dir, checkpoint)):
            self._save(args, state, model, os.path.join(checkpoint, CHECKPOINT_SUBFOLDER))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._save(args, state, model, "adapter-final")

    @staticmethod
    def _save(args, state, model, name: str) -> None:
        if state.is_world_process_zero:
            save_tied_lora(model, os.path.join(args.output_dir, name))
