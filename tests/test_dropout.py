"""Adapter dropout (PEFT's ``lora_dropout``): only the adapter's input is dropped. These tests cover the torch
path, the argument and the modules; the fused kernels' own mask is tested in ``test_kernels_dropout.py``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.helpers import assert_close_to_reference, cpu_triton
from tied_lora_kernels import (
    TiedLoRAConfig,
    TiedLoRALinear,
    TiedLoRAShared,
    apply_tied_lora,
    load_tied_lora,
    reference,
    save_tied_lora,
    tied_lora_layers,
    tied_lora_linear,
)


def _inputs(M=33, K=24, N=20, R=5, lead=()):
    g = torch.Generator().manual_seed(0)
    t = {
        "x": torch.randn(*lead, M, K, generator=g, dtype=torch.float64),
        "weight": torch.randn(N, K, generator=g, dtype=torch.float64) * K**-0.5,
        "bias": torch.randn(N, generator=g, dtype=torch.float64),
        "A": torch.randn(R, K, generator=g, dtype=torch.float64) * K**-0.5,
        "B": torch.randn(N, R, generator=g, dtype=torch.float64),
        "u": torch.randn(R, generator=g, dtype=torch.float64),
        "v": torch.randn(N, generator=g, dtype=torch.float64),
    }
    for name in ("x", "A", "B", "u", "v"):
        t[name].requires_grad_(True)
    return t


def _grads(y, t, dy):
    leaves = {k: v for k, v in t.items() if v.requires_grad}
    return dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy), strict=True))


@pytest.mark.parametrize("lead", [(), (3,)], ids=["2d", "3d"])
def test_dropout_drops_the_adapter_input_only(lead):
    """Output and every gradient equal the reference evaluated on ``x`` for the base and on the same dropped
    ``x`` (the same seed, the same draw) for the adapter, in float64."""
    t, p, s = _inputs(M=11, lead=lead), 0.4, 0.5
    args = [t[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    dy = torch.randn(*lead, 11, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.manual_seed(123)
    y = tied_lora_linear(t["x"], *args, s, backend="torch", dropout=p)
    got = _grads(y, t, dy)

    torch.manual_seed(123)
    mask = F.dropout(torch.ones_like(t["x"]), p)  # the draw the torch path made: 0 or 1 / (1 - p)
    assert 0 < (mask == 0).sum() < mask.numel() and set(mask.unique().tolist()) == {0.0, 1 / (1 - p)}
    base = F.linear(t["x"], t["weight"], t["bias"])
    expected = base + reference.tied_lora_forward(t["x"] * mask, torch.zeros_like(t["weight"]), None, *args[2:], s)
    want = _grads(expected, t, dy)
    assert_close_to_reference(y, expected, None, "y", torch.float64)
    for name in want:
        assert_close_to_reference(got[name], want[name], None, f"d{name}", torch.float64)
    # the base term saw every entry of x: without the adapter, dropout changes nothing
    zero_B = torch.zeros_like(t["B"])
    torch.manual_seed(123)
    plain = tied_lora_linear(t["x"], t["weight"], t["bias"], t["A"], zero_B, t["u"], t["v"], s, dropout=p)
    assert torch.equal(plain, base)


def test_zero_dropout_is_the_plain_call():
    t = _inputs()
    args = [t[k] for k in ("x", "weight", "bias", "A", "B", "u", "v")]
    assert torch.equal(tied_lora_linear(*args, 0.5, dropout=0.0), tied_lora_linear(*args, 0.5))


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan"), True, "0.1", None])
def test_bad_dropout_is_refused(p):
    t = _inputs()
    args = [t[k] for k in ("x", "weight", "bias", "A", "B", "u", "v")]
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\)"):
        tied_lora_linear(*args, 0.5, dropout=p)
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\)"):
        TiedLoRALinear.from_linear(nn.Linear(6, 4), TiedLoRAShared(6, 4, 2), dropout=p)
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\)"):
        TiedLoRAConfig(dropout=p)


def test_numpy_numbers_are_saved_as_floats(tmp_path):
    np = pytest.importorskip("numpy")
    config = TiedLoRAConfig(rank=2, target_modules=("q_proj",), dropout=np.float32(0.25), alpha=np.float64(4))
    save_tied_lora(apply_tied_lora(_Two(), config), tmp_path)
    assert load_tied_lora(_Two(), tmp_path).tied_lora_config.dropout == 0.25


@cpu_triton
def test_triton_layers_drop_in_training_only(tmp_path):
    """A triton layer trains with dropout (the fused kernels' mask, under the interpreter here) and evaluates
    without it, so an adapter trained with dropout loads onto triton for inference."""
    t = _inputs()
    args = [t[k] for k in ("x", "weight", "bias", "A", "B", "u", "v")]
    with pytest.raises(ValueError, match="backend must be one of"):  # the name is checked whatever the dropout
        tied_lora_linear(*args, 0.5, backend="bogus", dropout=0.1)

    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(2))
    layer, plain = _layer(0.5), _layer(0.0)
    layer.backend = plain.backend = "triton"
    torch.manual_seed(4)
    y = layer(x)
    torch.manual_seed(4)
    args = (layer.weight, layer.bias, layer.shared.A, layer.lora_B, layer.lora_u, layer.lora_v, layer.scale)
    assert torch.equal(y, tied_lora_linear(x, *args, backend="triton", dropout=0.5))
    assert not torch.equal(y, plain(x))
    y.sum().backward()
    assert layer.shared.A.grad is not None and layer.lora_v.grad is not None
    layer.eval()
    assert_close_to_reference(layer(x), _layer(0.0)(x).double(), None, "eval on triton", torch.float32)

    config = TiedLoRAConfig(rank=2, target_modules=("q_proj", "v_proj"), groups=(), dropout=0.2)
    save_tied_lora(apply_tied_lora(_Two(), config), tmp_path)
    fresh = load_tied_lora(_Two(), tmp_path, backend="triton").eval()
    h = torch.randn(3, 8)
    torch.testing.assert_close(fresh(h), _Two()(h), rtol=1e-6, atol=1e-6)  # zero start: the base model's output


def _layer(dropout):
    torch.manual_seed(0)
    shared = TiedLoRAShared(12, 10, 3, seed=0)
    layer = TiedLoRALinear.from_linear(nn.Linear(12, 10), shared, dropout=dropout)
    with torch.no_grad():
        layer.lora_v.normal_()
    return layer


def test_what_turns_every_dropout_off_turns_the_adapters_off():
    """TRL's ``disable_dropout`` (DPO's default) sets ``p = 0`` on every ``nn.Dropout``, which reaches PEFT's
    ``lora_dropout``: the adapter's probability is such a child's ``p`` (no child at 0), so it reaches this one's too
    (it stayed on: a DPO policy equal to its reference gave a first loss of 0.68, not log 2)."""
    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(2))
    layer, plain = _layer(0.5), _layer(0.0)
    assert isinstance(layer.dropout, nn.Dropout) and "dropout" not in dict(plain.named_children())
    for module in layer.modules():  # (trl.trainer.utils.disable_dropout_in_model)
        if isinstance(module, nn.Dropout):
            module.p = 0
    assert layer.lora_dropout == 0.0 and torch.equal(layer.train()(x), plain.train()(x))
    layer.lora_dropout = 0.25
    assert layer.dropout.p == 0.25 and "dropout=0.25" in repr(layer)
    layer.lora_dropout = 0.0  # the child stays, at p = 0 (docs/api.md: absent only until a non-zero p is set)
    assert isinstance(layer.dropout, nn.Dropout) and layer.dropout.p == 0.0 and layer.lora_dropout == 0.0
    with pytest.raises(ValueError, match="dropout"):
        layer.lora_dropout = 1.5


def test_a_layer_pickled_with_a_float_dropout_keeps_it():
    """Layers pickled before the probability became an ``nn.Dropout`` child's kept it as a float attribute, which
    the property would hide (read as 0): unpickling moves it into the child."""
    import pickle

    layer = _layer(0.0)
    state = {**layer.__dict__, "lora_dropout": 0.3}  # (as such a layer's __dict__ held it)
    old = TiedLoRALinear.__new__(TiedLoRALinear)
    old.__setstate__(state)
    assert old.lora_dropout == 0.3 and isinstance(old.dropout, nn.Dropout) and "lora_dropout" not in old.__dict__
    assert pickle.loads(pickle.dumps(old)).lora_dropout == 0.3


def test_layer_drops_in_training_mode_only():
    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(2))
    layer, plain = _layer(0.5), _layer(0.0)
    assert "dropout=0.5" in repr(layer) and "dropout" not in repr(plain)
    layer.eval()
    assert torch.equal(layer(x), plain(x))
    layer.train()
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    args = (layer.weight, layer.bias, layer.shared.A, layer.lora_B, layer.lora_u, layer.lora_v, layer.scale)
    assert torch.equal(y, tied_lora_linear(x, *args, dropout=0.5))
    assert not torch.equal(y, plain(x))


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, h):
        return self.v_proj(torch.tanh(self.q_proj(h)))


def test_config_sets_every_layer_and_save_load_keeps_it(tmp_path):
    config = TiedLoRAConfig(rank=2, target_modules=("q_proj", "v_proj"), groups=(), dropout=0.2)
    model = apply_tied_lora(_Two(), config)
    assert {layer.lora_dropout for layer in tied_lora_layers(model).values()} == {0.2}
    save_tied_lora(model, tmp_path)
    fresh = load_tied_lora(_Two(), tmp_path)
    assert {layer.lora_dropout for layer in tied_lora_layers(fresh).values()} == {0.2}
    assert fresh.tied_lora_config.dropout == 0.2


def test_adapter_files_without_dropout_load_with_none(tmp_path):
    """Files written before the option existed have no ``dropout`` in their config: they load with 0."""
    import json

    save_tied_lora(apply_tied_lora(_Two(), TiedLoRAConfig(rank=2, target_modules=("q_proj", "v_proj"))), tmp_path)
    meta_path = tmp_path / "adapter_config.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["dropout"]
    meta_path.write_text(json.dumps(meta))
    fresh = load_tied_lora(_Two(), tmp_path)
    assert {layer.lora_dropout for layer in tied_lora_layers(fresh).values()} == {0.0}


def test_dropout_under_torch_compile():
    layer = _layer(0.3)
    x = torch.randn(7, 12)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    assert y.shape == (7, 10) and not torch.equal(y, _layer(0.0)(x))
    layer.eval()
    assert torch.equal(compiled(x), _layer(0.0)(x))


def test_numpy_float32_alpha_is_stored_as_a_python_float(tmp_path):
    """A numpy float32 alpha (not a float subclass, unlike float64) is stored as a float, so the config saves."""
    np = pytest.importorskip("numpy")
    config = TiedLoRAConfig(rank=2, target_modules=("q_proj",), alpha=np.float32(4))
    assert type(config.alpha) is float
    save_tied_lora(apply_tied_lora(_Two(), config), tmp_path)
    assert load_tied_lora(_Two(), tmp_path).tied_lora_config.alpha == 4.0
