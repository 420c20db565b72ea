"""Small models for the model-level tests: every adapter configuration, a toy attention stack, a tiny Llama."""

from __future__ import annotations

import itertools

import torch
import transformers
from torch import nn

from tied_lora_kernels import tied_lora_state_dict

# every configuration: the four presets, and every combination of tying × trained factors (30 of them)
CONFIGS = {name: dict(preset=name) for name in ("lora", "tl5", "tl6", "vera")}
for tie, flags in itertools.product((True, False), itertools.product((True, False), repeat=4)):
    if any(flags):
        name = ("tied_" if tie else "untied_") + "".join(k for k, f in zip("ABuv", flags, strict=True) if f)
        CONFIGS[name] = dict(tie=tie, **{f"train_{k}": f for k, f in zip("ABuv", flags, strict=True)})


class Block(nn.Module):
    def __init__(self, d, kv):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, kv), nn.Linear(d, kv)
        self.o_proj = nn.Linear(kv, d, bias=False)

    def forward(self, h):
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        return h + self.o_proj(torch.tanh(q[..., : k.shape[-1]]) * k + v)


class Toy(nn.Module):
    """A few attention-shaped blocks (GQA: k/v narrower than q), so groups and ties are exercised."""

    def __init__(self, d=24, kv=16, layers=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(Block(d, kv) for _ in range(layers))

    def forward(self, h):
        for block in self.layers:
            h = block(h)
        return h


def randomise_adapters(model, seed=1):
    """Give every adapter factor non-zero values (a zero start hides gradient bugs)."""
    g = torch.Generator().manual_seed(seed)
    buffers = {name for name, _ in model.named_buffers()}  # (a saved module's running statistics stay as they are)
    with torch.no_grad():
        for name, p in tied_lora_state_dict(model).items():
            if name not in buffers:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def tiny_llama(seed=0, **kw):
    torch.manual_seed(seed)
    shape = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=64,
    )
    config = transformers.LlamaConfig(**{**shape, **kw})
    return transformers.LlamaForCausalLM(config).eval()


def enable_checkpointing(model, reentrant: bool, input_grads: bool = True) -> None:
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.18
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant and input_grads:
        model.enable_input_require_grads()  # transformers 5 did it already for token ids; 4.x did not
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def transformers_4_input_grad_hook(monkeypatch):
    """``enable_input_require_grads`` as transformers 4 has it: one handle in ``_require_grads_hook`` (5 keeps the
    list ``_require_grads_hooks`` too)."""

    def enable(self):
        hook = self.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
        self._require_grads_hook = hook

    monkeypatch.setattr(transformers.PreTrainedModel, "enable_input_require_grads", enable)
    monkeypatch.setattr(
        transformers.PreTrainedModel, "disable_input_require_grads", lambda s: s._require_grads_hook.remove()
    )
