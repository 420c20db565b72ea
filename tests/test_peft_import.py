"""``load_peft_adapter``: a PEFT LoRA or VeRA adapter, loaded onto the bare base model, computes what PEFT computes
with it (float64, within 1e-12), trains, and round-trips through ``export_peft_lora``."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_conv1d import tiny_gpt2
from tests.test_model import tiny_llama
from tied_lora_kernels import (
    TiedLoRAConfig,
    apply_tied_lora,
    export_peft_lora,
    load_peft_adapter,
    tied_lora_layers,
    tied_lora_state_dict,
)

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def _peft_adapter(directory, config, base=tiny_llama, seed=1):
    """A PEFT adapter with every factor random (PEFT starts lora_B / lambda_b at zero), saved to ``directory``;
    returns PEFT's logits in float64."""
    model = peft.get_peft_model(base().double(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_", "vera_lambda", "modules_to_save")):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    model.save_pretrained(directory)
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(
    "config",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], modules_to_save=["lm_head"]),
        dict(r=4, lora_alpha=3, use_rslora=True, target_modules="all-linear", lora_dropout=0.1),
    ],
    ids=["lora", "rslora_all_linear"],
)
def test_lora_computes_what_peft_computes(tmp_path, config):
    expected = _peft_adapter(tmp_path, peft.LoraConfig(**config))
    model = load_peft_adapter(tiny_llama().double(), tmp_path, backend="torch").eval()
    layers = tied_lora_layers(model)
    assert len({id(layer.shared) for layer in layers.values()}) == len(layers)  # one pair per layer: untied
    scaling = config["lora_alpha"] / (2.0 if config.get("use_rslora") else 4.0)
    assert all(
        layer.scale == scaling and layer.lora_dropout == config.get("lora_dropout", 0.0) for layer in layers.values()
    )
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-12, atol=1e-12)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(("shared.A", "shared.B")) or n.startswith("lm_head") for n in trained)
    assert ("lm_head.weight" in trained) == ("modules_to_save" in config)

    # and back: the export loads in PEFT with the same logits
    export_peft_lora(model, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(tiny_llama().double(), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, expected, rtol=1e-12, atol=1e-12)


def test_vera_computes_what_peft_computes(tmp_path):
    config = peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])  # in 32 and 64: sliced A
    expected = _peft_adapter(tmp_path, config)
    model = load_peft_adapter(tiny_llama().double(), tmp_path, backend="torch").eval()
    layers = tied_lora_layers(model)
    assert len({id(layer.shared) for layer in layers.values()}) == 3  # one pair per role, tied across layers
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-12, atol=1e-12)
    trained = {n.rpartition(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"u", "lora_v"}  # A and B stay frozen, as in VeRA


def test_gpt2_conv1d_lora(tmp_path):
    """GPT-2's Conv1D layers (PEFT's fan_in_fan_out)."""
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"])
    expected = _peft_adapter(tmp_path, config, base=tiny_gpt2)
    model = load_peft_adapter(tiny_gpt2().double(), tmp_path, backend="torch").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-12, atol=1e-12)


def test_refusals_leave_the_model_untouched(tmp_path):
    _peft_adapter(tmp_path / "dora", peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    _peft_adapter(
        tmp_path / "ia3", peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    _peft_adapter(tmp_path / "lora", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    for name, error, match in (
        ("dora", ValueError, r"uses \['use_dora'\]"),
        ("ia3", ValueError, "holds a PEFT IA3 adapter"),
    ):
        model = tiny_llama().double()
        with pytest.raises(error, match=match):
            load_peft_adapter(model, tmp_path / name)
        assert not tied_lora_layers(model) and all(p.requires_grad for p in model.parameters())
    other = tiny_llama(hidden_size=48).double()  # other shapes
    with pytest.raises(ValueError, match=r"the PEFT adapter's A is \(4, 32\), this layer needs \(4, 48\)"):
        load_peft_adapter(other, tmp_path / "lora")
    assert not tied_lora_layers(other)
    adapted = apply_tied_lora(tiny_llama().double(), TiedLoRAConfig(rank=4))
    with pytest.raises(RuntimeError, match="already has Tied-LoRA adapters"):
        load_peft_adapter(adapted, tmp_path / "lora")
    # a bf16 file: float32 adapters holding exactly its values
    meta = json.loads((tmp_path / "lora/adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA"
    model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    loaded = load_peft_adapter(tiny_llama(), tmp_path / "bf16")
    state = tied_lora_state_dict(loaded)
    assert {t.dtype for t in state.values()} == {torch.float32}
    A = state["model.layers.0.self_attn.q_proj.shared.A"]
    assert torch.equal(A, model.base_model.model.model.layers[0].self_attn.q_proj.lora_A.default.weight.float())
