"""Hugging Face ``Trainer`` support (imports transformers; not imported by ``tied_lora_kernels`` itself).

``Trainer``'s own checkpoints call ``save_pretrained``, which refuses a state dict in which one tensor appears
under several names — the tied ``A`` and ``B`` of every adapted layer. Train with ``save_strategy="no"`` and
this callback instead: it writes the adapter alone (``save_tied_lora``: each tied tensor once, a few MB) every
``every`` optimizer steps and when training ends::

    args = TrainingArguments("out", save_strategy="no", ...)
    Trainer(model=model, args=args, ..., callbacks=[SaveTiedLoRACallback(every=500)]).train()
    # out/adapter-500/, out/adapter-1000/, ..., out/adapter-final/  (load_tied_lora(model, path))
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

from tied_lora_kernels.model import save_tied_lora

__all__ = ["SaveTiedLoRACallback"]


class SaveTiedLoRACallback(TrainerCallback):
    """Save the adapter to ``{output_dir}/adapter-{step}`` every ``every`` steps (None: only at the end) and to
    ``{output_dir}/adapter-final`` when training ends; only the main process writes."""

    def __init__(self, every: int | None = None):
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every <= 0):
            raise ValueError(f"every must be a positive int or None, got {every!r}")
        self.every = every

    def on_train_begin(self, args, state, control, **kwargs):
        if str(getattr(args.save_strategy, "value", args.save_strategy)) != "no":
            raise ValueError(
                "Trainer's checkpoints call save_pretrained, which refuses the tensors Tied-LoRA shares between "
                "layers: set TrainingArguments(save_strategy='no'); SaveTiedLoRACallback saves the adapter"
            )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every is not None and state.global_step % self.every == 0:
            self._save(args, state, model, f"adapter-{state.global_step}")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._save(args, state, model, "adapter-final")

    @staticmethod
    def _save(args, state, model, name: str) -> None:
        if state.is_world_process_zero:
            save_tied_lora(model, os.path.join(args.output_dir, name))
