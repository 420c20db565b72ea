"""GPT-2's ``Conv1D`` (transformers: ``y = x·W + b`` with ``weight`` stored ``[in, out]``) as an adapted layer:
``TiedLoRAConv1D`` keeps the ``Conv1D``'s parameters and computes what ``TiedLoRALinear`` computes over the same
weight as ``nn.Linear`` stores it, on both backends; a GPT-2 model adapts, ties, merges, unloads back to
``Conv1D``, saves, loads and exports to PEFT."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from tests.helpers import assert_close_to_reference, cpu_triton
from tests.models import randomise_adapters
from tied_lora_kernels import (
    TiedLoRAConfig,
    TiedLoRAConv1D,
    TiedLoRALinear,
    TiedLoRAShared,
    apply_tied_lora,
    disable_tied_lora,
    export_peft_lora,
    load_tied_lora,
    merge_tied_lora,
    reference,
    save_tied_lora,
    tied_lora_layers,
    tied_lora_state_dict,
    unload_tied_lora,
    unmerge_tied_lora,
)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def _conv_layer(backend, dtype):
    torch.manual_seed(0)
    conv = Conv1D(40, 24).to(dtype)
    with torch.no_grad():
        conv.bias.normal_()
    layer = TiedLoRALinear.from_linear(conv, TiedLoRAShared(24, 40, 4, seed=0), backend=backend)
    layer.to(dtype if dtype == torch.float64 else torch.float32)  # float32 master adapters beside 16-bit x
    layer.weight.data, layer.bias.data = conv.weight.data.to(dtype), conv.bias.data.to(dtype)
    with torch.no_grad():
        layer.lora_v.normal_(generator=torch.Generator().manual_seed(1))
        layer.lora_u.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    return conv, layer


@pytest.mark.parametrize(
    "backend,dtype",
    [("torch", torch.float64), ("torch", torch.float32)]
    + [pytest.param("triton", d, marks=cpu_triton) for d in (torch.float32, torch.bfloat16)],
)
def test_conv1d_layer_matches_the_reference(backend, dtype):
    """Output and every gradient (x, W, b, A, B, u, v) against the float64 reference over ``Wᵀ``, with the
    tolerance rule of tests/helpers.py; the layer keeps the Conv1D's parameters and its ``nf``/``nx``."""
    conv, layer = _conv_layer(backend, dtype)
    assert isinstance(layer, TiedLoRAConv1D) and layer.weight.shape == (24, 40)
    assert (layer.nf, layer.nx, layer.in_features, layer.out_features) == (40, 24, 24, 40)
    layer.weight.requires_grad_(True)
    params = [layer.weight, layer.bias, layer.shared.A, layer.shared.B, layer.lora_u, layer.lora_v]
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_(True)
    weights = torch.linspace(-1, 1, 40, dtype=torch.float64)

    def run(forward):
        y = forward(x, *params)
        grads = torch.autograd.grad((y.double() * weights).sum(), [x, *params])
        return y, grads

    def reference_forward(upcast):
        return lambda x, W, b, A, B, u, v: reference.tied_lora_forward(
            x, W.t(), b, A, B, u, v, layer.scale, upcast=upcast
        )

    got = run(lambda x, *p: layer(x))
    want = run(reference_forward(True))
    base = run(reference_forward(False))
    names = ["y", "x", "W", "b", "A", "B", "u", "v"]
    for name, g, w, b in zip(names, [got[0], *got[1]], [want[0], *want[1]], [base[0], *base[1]], strict=True):
        assert_close_to_reference(g, w, b, name, dtype if name in ("y", "x", "W", "b") else None)


def test_conv1d_merge_unmerge_disable_and_errors():
    conv, layer = _conv_layer("torch", torch.float64)
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    with torch.no_grad():
        base, adapted = conv(x), layer(x)
        assert not torch.equal(base, adapted)
        layer.disabled = True
        assert torch.equal(layer(x), base)  # Conv1D's own computation, bit for bit
        layer.disabled = False
        assert torch.equal(layer.delta_weight(), reference.delta_weight(
            layer.shared.A, layer.shared.B, layer.lora_u, layer.lora_v, layer.scale
        ))  # fmt: skip
        weight = layer.weight.clone()
        layer.merge()
        torch.testing.assert_close(layer.weight, weight + layer.delta_weight().t(), rtol=0, atol=1e-15)
        torch.testing.assert_close(layer(x), adapted, rtol=1e-12, atol=1e-12)
        layer.unmerge()
        torch.testing.assert_close(layer.weight, weight, rtol=0, atol=1e-15)
    with pytest.raises(TypeError, match="adapts an existing Conv1D"):
        TiedLoRAConv1D(40, 24, shared=TiedLoRAShared(24, 40, 4))
    with pytest.raises(TypeError, match="already has a Tied-LoRA adapter"):
        TiedLoRALinear.from_linear(layer, TiedLoRAShared(24, 40, 4))


def test_a_conv1d_without_nx_adapts():
    """Conv1D has ``nx`` from transformers 4.45 on (``nf`` always): its sizes come from its weight, ``[in, out]``."""
    conv = Conv1D(40, 24)
    del conv.nx
    layer = TiedLoRALinear.from_linear(conv, TiedLoRAShared(24, 40, 4))
    assert (layer.shared.A.shape, layer.shared.B.shape) == ((4, 24), (40, 4))
    assert layer(torch.randn(3, 24)).shape == (3, 40)


def test_gpt2_adapts_ties_merges_and_unloads_to_conv1d():
    """ "all-linear" takes GPT-2's four Conv1D roles (not lm_head), one tied pair each; at the zero start the
    model is the base bit for bit; merge and unload give back Conv1D layers computing the adapted model."""
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny_gpt2()(ids).logits
    model = apply_tied_lora(tiny_gpt2(), TiedLoRAConfig(rank=4, preset="tl6", target_modules="all-linear"))
    layers = tied_lora_layers(model)
    assert sorted(layers) == sorted(
        f"transformer.h.{i}.{name}"
        for i in range(2)
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    assert all(type(layer) is TiedLoRAConv1D for layer in layers.values())
    assert len({id(layer.shared) for layer in layers.values()}) == 4  # attn.c_proj and mlp.c_proj apart
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
        randomise_adapters(model)
        adapted = model(ids).logits
        assert not torch.allclose(adapted, expected)
        with disable_tied_lora(model):
            assert torch.equal(model(ids).logits, expected)
        merge_tied_lora(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-4)
        unmerge_tied_lora(model)
        merge_tied_lora(model, unload=True)
        assert not tied_lora_layers(model)
        assert type(model.transformer.h[0].attn.c_attn) is Conv1D
        assert model.transformer.h[0].attn.c_attn.weight.shape == (32, 96)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-4)
    fresh = apply_tied_lora(tiny_gpt2(), TiedLoRAConfig(rank=4, target_modules="all-linear"))
    randomise_adapters(fresh)
    unload_tied_lora(fresh)  # without merging: the base GPT-2, Conv1D layers, bit for bit
    assert type(fresh.transformer.h[1].mlp.c_proj) is Conv1D
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


@cpu_triton
def test_gpt2_trains_on_the_triton_path():
    """The model's loss and every adapter gradient on the kernels equal the torch path's."""
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    grads = {}
    for backend in ("torch", "triton"):
        model = apply_tied_lora(tiny_gpt2(), TiedLoRAConfig(rank=4, target_modules="all-linear", backend=backend))
        randomise_adapters(model)
        model(ids, labels=ids).loss.backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["torch"].keys() == grads["triton"].keys() and grads["torch"]
    for name, g in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_gpt2_saves_loads_and_exports_to_peft(tmp_path):
    peft = pytest.importorskip("peft")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    config = TiedLoRAConfig(rank=4, preset="tl6", target_modules=("c_attn", "c_fc"), dtype=torch.float64)
    model = apply_tied_lora(tiny_gpt2().double(), config)
    randomise_adapters(model)
    with torch.no_grad():
        expected = model(ids).logits
    save_tied_lora(model, tmp_path / "tied")
    fresh = load_tied_lora(tiny_gpt2().double(), tmp_path / "tied")
    saved = tied_lora_state_dict(model)
    assert all(torch.equal(t, saved[k]) for k, t in tied_lora_state_dict(fresh).items()) and saved
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)

    export_peft_lora(model, tmp_path / "peft")
    meta = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert meta["fan_in_fan_out"] is True and meta["task_type"] == "CAUSAL_LM"  # GPT2LMHeadModel is a causal LM
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2().double(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(expected, tiny_gpt2().double()(ids).logits)


def test_a_saved_gpt2_adapter_refuses_a_model_with_other_shapes(tmp_path):
    save_tied_lora(apply_tied_lora(tiny_gpt2(), TiedLoRAConfig(rank=4, target_modules=("c_attn",))), tmp_path)
    other = tiny_gpt2()
    other.transformer.h[0].attn.c_attn = Conv1D(64, 32)
    with pytest.raises(ValueError, match=r"saved for \[96, 32\], this model's layer is \[64, 32\]"):
        load_tied_lora(other, tmp_path)
    other.transformer.h[0].attn.c_attn = nn.Identity()
    with pytest.raises(ValueError, match="module there is Identity"):
        load_tied_lora(other, tmp_path)


def test_conv1d_layer_reset_parameters_is_conv1d_s_init():
    """reset_parameters (the meta-device flow) gives a TiedLoRAConv1D Conv1D's own init: weight ~ N(0, 0.02²),
    bias zero, and the adapter's zero start."""
    with torch.device("meta"):
        layer = TiedLoRALinear.from_linear(Conv1D(64, 64), TiedLoRAShared(64, 64, 4, seed=0))
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert 0.018 < layer.weight.std().item() < 0.022 and torch.count_nonzero(layer.bias) == 0
    assert torch.count_nonzero(layer.lora_v) == 0
