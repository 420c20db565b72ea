"""Tied-LoRA (arXiv 2311.09578) for PyTorch: fused Triton kernels, a drop-in ``nn.Linear`` and model helpers.

y = x Wᵀ + b + s · v ⊙ (B (u ⊙ (A x)))        A [r, in], B [out, r] shared by all layers; u [r], v [out] per layer
"""

from tied_lora_kernels import reference
from tied_lora_kernels.config import ALL_LINEAR, PRESETS, QKV, TiedLoRAConfig
from tied_lora_kernels.export import export_peft_lora
from tied_lora_kernels.functional import tied_lora_linear
from tied_lora_kernels.layer import AdapterOptions, TiedLoRAConv1D, TiedLoRAFalconLinear, TiedLoRALinear
from tied_lora_kernels.model import (
    ParameterCount,
    apply_tied_lora,
    count_parameters,
    disable_tied_lora,
    merge_tied_lora,
    tied_lora_layers,
    unload_tied_lora,
    unmerge_tied_lora,
)
from tied_lora_kernels.peft_import import load_peft_adapter
from tied_lora_kernels.save_load import load_tied_lora, save_tied_lora, tied_lora_state_dict
from tied_lora_kernels.shared import TiedLoRAShared

__version__ = "0.1.0"

__all__ = [
    "ALL_LINEAR",
    "AdapterOptions",
    "PRESETS",
    "QKV",
    "ParameterCount",
    "TiedLoRAConfig",
    "TiedLoRAConv1D",
    "TiedLoRAFalconLinear",
    "TiedLoRALinear",
    "TiedLoRAShared",
    "apply_tied_lora",
    "count_parameters",
    "disable_tied_lora",
    "export_peft_lora",
    "load_peft_adapter",
    "load_tied_lora",
    "merge_tied_lora",
    "reference",
    "save_tied_lora",
    "tied_lora_layers",
    "tied_lora_linear",
    "tied_lora_state_dict",
    "unload_tied_lora",
    "unmerge_tied_lora",
]
