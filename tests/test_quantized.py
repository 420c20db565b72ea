"""bitsandbytes' quantized linears (QLoRA): the adapter runs beside the quantized layer's own forward, on the
torch path, with the layer's state-dict keys kept. On CPU (bitsandbytes ≥ 0.46 quantizes and multiplies there)."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from torch import nn

from tests.models import randomise_adapters, tiny_llama
from tied_lora_kernels import (
    TiedLoRAConfig,
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
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnb = pytest.importorskip("bitsandbytes")

KINDS = ["4bit", "8bit"]


def quantized(linear: nn.Linear, kind: str) -> nn.Linear:
    """``linear`` as a bitsandbytes layer, quantized on the CPU."""
    if kind == "4bit":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4")  # fmt: skip
    else:
        q = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False
        )
    q.load_state_dict(linear.state_dict())
    return q.to("cpu")  # quantizes


def quantized_llama(kind="4bit", seed=0):
    model = tiny_llama(seed, hidden_size=64, intermediate_size=128)  # (bitsandbytes' CPU path: in ≥ its block)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantized(module, kind))
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_adds_the_adapter_to_the_quantized_output(kind, dropout):
    torch.manual_seed(0)
    base = quantized(nn.Linear(40, 24), kind)
    shared = TiedLoRAShared(40, 24, 4, seed=0)
    layer = TiedLoRALinear.from_linear(base, shared, alpha=8.0, dropout=dropout)  # scale 2
    assert isinstance(layer, type(base)) and type(layer).__name__ == f"TiedLoRA{type(base).__name__}"
    assert layer.quantized and layer.weight is base.weight
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (shared.A, shared.B, layer.lora_u, layer.lora_v):
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(3, 5, 40, generator=g, requires_grad=True)
    dy = torch.randn(3, 5, 24, generator=g)
    params = [shared.A, shared.B, layer.lora_u, layer.lora_v]

    torch.manual_seed(3)
    y = layer(x)
    got = torch.autograd.grad(y, [x, *params], dy)
    torch.manual_seed(3)  # the same draw: the adapter's input only is dropped
    x_adapter = nn.functional.dropout(x, dropout) if dropout else x
    y_ref = base(x) + reference.tied_lora_forward(x_adapter, torch.zeros(24, 40), None, *params, 2.0)
    want = torch.autograd.grad(y_ref, [x, *params], dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["x", "A", "B", "u", "v"], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")

    keys = set(base.state_dict())
    assert keys <= set(layer.state_dict()) and "weight" in keys
    for key in keys:
        assert torch.equal(layer.state_dict()[key], base.state_dict()[key]), key
    with pytest.raises(RuntimeError, match=f"cannot merge into a quantized {type(base).__name__} weight"):
        layer.merge()
    with pytest.raises(ValueError, match="backend='triton' needs a plain weight"):
        TiedLoRALinear.from_linear(quantized(nn.Linear(40, 24), kind), TiedLoRAShared(40, 24, 4), backend="triton")


@pytest.mark.parametrize("kind", KINDS)
def test_qlora_model_trains_disables_saves_and_loads(kind, tmp_path):
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    model = quantized_llama(kind)
    with torch.no_grad():
        before = model(ids).logits
    apply_tied_lora(model, TiedLoRAConfig(rank=4, preset="tl6", target_modules="all-linear"))
    assert len(tied_lora_layers(model)) == 14 and all(layer.quantized for layer in tied_lora_layers(model).values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # the zero start
    randomise_adapters(model)
    model.train()
    model(ids, labels=ids).loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    model.eval()
    with torch.no_grad(), disable_tied_lora(model):
        disabled = model(ids).logits
    with torch.no_grad():  # (bitsandbytes' CPU kernels differ between modes: compare in one)
        for layer in tied_lora_layers(model).values():
            layer.lora_v.zero_()
        assert torch.equal(model(ids).logits, disabled)  # a zero adapter adds exact zeros
    randomise_adapters(model)
    with pytest.raises(RuntimeError, match="cannot merge into a quantized"):
        merge_tied_lora(model)
    assert not any(layer.merged for layer in tied_lora_layers(model).values())  # refused before touching any

    with torch.no_grad():
        expected = model(ids).logits
    save_tied_lora(model, tmp_path)
    fresh = load_tied_lora(quantized_llama(kind), tmp_path)
    with torch.no_grad():  # bitsandbytes' CPU kernels round differently once a layer has run in training mode
        fresh(ids)
    fresh.train()(ids)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids).logits, expected)

    # a bf16 adapter file (saved after converting the adapters) goes into float32 adapters beside the quantized
    # layers, whose inputs are float32 here: exactly the saved values, and it runs
    for layer in tied_lora_layers(model).values():
        layer.shared.to(torch.bfloat16), layer.lora_scale.to(torch.bfloat16)
        layer.lora_v.data = layer.lora_v.data.bfloat16()
    save_tied_lora(model, tmp_path / "bf16")
    fresh = load_tied_lora(quantized_llama(kind), tmp_path / "bf16")
    state, saved = tied_lora_state_dict(fresh), tied_lora_state_dict(model)
    assert all(t.dtype == torch.float32 and torch.equal(t, saved[k].float()) for k, t in state.items())
    with torch.no_grad():
        fresh(ids)

    # unloaded (PEFT's unload()): the bitsandbytes layers again, same parameters and keys, computing the base
    with torch.no_grad(), disable_tied_lora(model):
        disabled = model.eval()(ids).logits
    q_weight = model.model.layers[0].self_attn.q_proj.weight
    unload_tied_lora(model)
    with torch.no_grad():  # (before state_dict(): bitsandbytes repacks CPU 4-bit weights there, which rounds apart)
        assert torch.equal(model(ids).logits, disabled)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is type(quantized_llama(kind).model.layers[0].self_attn.q_proj) and q.weight is q_weight
    assert not tied_lora_layers(model) and set(model.state_dict()) == set(quantized_llama(kind).state_dict())
    assert not any(hasattr(q, name) for name in ("shared", "lora_v", "rank", "scale"))
    pickle.loads(pickle.dumps(model))


def test_adapted_quantized_layers_copy_and_pickle():
    import copy

    from tied_lora_kernels import layer as layer_module

    layer = TiedLoRALinear.from_linear(quantized(nn.Linear(64, 32), "4bit"), TiedLoRAShared(64, 32, 4, seed=0))
    x = torch.randn(3, 64)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(twin) is type(layer)
        torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)
    # a fresh process unpickling one finds its class by name on the module
    assert layer_module.__getattr__("TiedLoRALinear8bitLt").base_class is bnb.nn.Linear8bitLt
    with pytest.raises(AttributeError):
        layer_module.__getattr__("TiedLoRANotALayer")


def test_what_is_bound_to_the_old_layer_stays_behind():
    """An instance-level forward (a patch) or ``module.compile()``'s call is bound to the quantized layer being
    replaced: copied over, the adapted layer would run the old forward and skip its adapter."""
    x = torch.randn(3, 64)
    for prepare in ("patch", "compile"):
        base = quantized(nn.Linear(64, 32), "4bit")
        if prepare == "patch":
            base.forward = base.forward  # what accelerate's hooks and user patches leave on the instance
        else:
            base.compile(backend="eager")
        plain = base(x)
        layer = TiedLoRALinear.from_linear(base, TiedLoRAShared(64, 32, 4, seed=0))
        with torch.no_grad():
            layer.lora_v.fill_(1.0)
        assert not torch.allclose(layer(x), plain), prepare
        assert layer.weight.module is layer  # bitsandbytes' Params4bit finds its layer there


def test_add_adapter_checks_its_inputs():
    from tied_lora_kernels.functional import add_adapter

    y, x, A, B = torch.zeros(3, 6), torch.randn(3, 5), torch.randn(2, 5), torch.randn(6, 2)
    cases = [
        (dict(u=torch.ones(1)), ValueError, "u must be 1-D of length 2"),
        (dict(x=x.long()), TypeError, "floating-point"),
        (dict(A=A.double()), TypeError, "A is torch.float64 but x is torch.float32"),
        (dict(y=torch.zeros(3, 7)), ValueError, "y must be"),
        (dict(dropout=1.5), ValueError, "dropout must be"),
    ]
    for change, error, match in cases:
        args = dict(y=y, x=x, A=A, B=B, u=None, v=None) | {k: v for k, v in change.items() if k != "dropout"}
        with pytest.raises(error, match=match):
            add_adapter(**args, dropout=change.get("dropout", 0.0))


def test_reset_count_and_backend_override():
    from tied_lora_kernels import count_parameters

    plain = tiny_llama(hidden_size=64, intermediate_size=128)
    model = apply_tied_lora(quantized_llama(), TiedLoRAConfig(rank=4, target_modules="all-linear"))
    adapter = count_parameters(model).trainable
    assert count_parameters(model).total == count_parameters(plain).total + adapter  # 4-bit: two values a byte
    layer = model.model.layers[0].self_attn.q_proj
    weight = layer.weight.data.clone()
    with torch.no_grad():
        layer.lora_v.fill_(3.0)
    layer.reset_parameters()  # the adapter only: a quantized weight is not re-initialised
    assert torch.equal(layer.weight.data, weight) and not layer.lora_v.any()
    for backend, match in (("bogus", "backend must be one of"), ("triton", "include quantized ones")):
        with pytest.raises(ValueError, match=match):
            load_tied_lora(model, "/nonexistent", backend=backend)


def test_triton_backend_and_other_subclasses_are_refused_up_front():
    model = quantized_llama()
    with pytest.raises(ValueError, match="is a quantized Linear4bit: backend='triton' needs plain weights"):
        apply_tied_lora(model, TiedLoRAConfig(rank=4, backend="triton"))
    assert not tied_lora_layers(model)
    mha = nn.Sequential(nn.MultiheadAttention(16, 2))
    with pytest.raises(TypeError, match=r"only nn.Linear layers, transformers' Conv1D \(GPT-2\) and FalconLinear, and"):
        apply_tied_lora(mha, TiedLoRAConfig(rank=2, target_modules=("out_proj",)))


def test_export_loads_in_peft_over_the_quantized_model(tmp_path):
    peft = pytest.importorskip("peft")
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    model = apply_tied_lora(quantized_llama(), TiedLoRAConfig(rank=4, preset="tl6"))
    randomise_adapters(model)
    # training mode (no dropout here): bitsandbytes' CPU inference path rounds activations to bf16
    with torch.no_grad():
        expected = model.train()(ids).logits
        base = quantized_llama().train()(ids).logits
    export_peft_lora(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(quantized_llama(), tmp_path)
    with torch.no_grad():
        got = loaded.train()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 0.1  # the adapter does something


def test_a_bf16_adapter_file_stays_bf16_beside_4bit_layers_that_compute_in_bf16(tmp_path):
    """A 16-bit adapter file loads in its own dtype where the quantized layers compute in it (Linear4bit's
    compute_dtype, its weight being packed uint8), and as float32 beside layers that compute in float32."""

    def model(compute_dtype):
        m = quantized_llama("4bit")
        for layer in m.modules():
            if isinstance(layer, bnb.nn.Linear4bit):
                layer.compute_dtype = compute_dtype
        return m

    config = TiedLoRAConfig(rank=4, preset="tl6", dtype=torch.bfloat16)
    save_tied_lora(apply_tied_lora(model(torch.bfloat16), config), tmp_path)
    loaded = load_tied_lora(model(torch.bfloat16), tmp_path)
    assert {t.dtype for t in tied_lora_state_dict(loaded).values()} == {torch.bfloat16}
    loaded = load_tied_lora(model(torch.float32), tmp_path)
    assert {t.dtype for t in tied_lora_state_dict(loaded).values()} == {torch.float32}
