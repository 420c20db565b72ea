"""``TiedLoRAShared`` and ``TiedLoRALinear``: drop-in behaviour, merge/unmerge, tying and clear errors."""

from __future__ import annotations

import copy
import inspect
import typing
import warnings

import pytest
import torch
from torch import nn
from typing_extensions import Unpack

from tests.helpers import assert_close_to_reference, cpu_triton
from tied_lora_kernels import (
    AdapterOptions,
    TiedLoRAConfig,
    TiedLoRAConv1D,
    TiedLoRALinear,
    TiedLoRAShared,
    reference,
    tied_lora_linear,
)


def _randomised(shared: TiedLoRAShared, layer: TiedLoRALinear, seed=0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (shared.A, shared.B, layer.lora_u, layer.lora_v):
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=g))


def _merge_round_trip_atol(base: torch.Tensor, *deltas: torch.Tensor) -> float:
    """How far a float32 weight may be from ``base`` after merge (and unmerge) of the ``deltas``: weight + ΔW rounded
    once, then minus ΔW rounded once, is at most eps · (|w| + |ΔW| / 2) from w; with a margin of 4."""
    largest = max(d.abs().max().item() for d in deltas)
    return 4 * torch.finfo(torch.float32).eps * (base.abs().max().item() + largest)


def test_shared_shapes_flags_and_seed():
    a = TiedLoRAShared(16, 12, 4, train_A=False, seed=3)
    b = TiedLoRAShared(16, 12, 4, train_A=False, seed=3)
    assert a.A.shape == (4, 16) and a.B.shape == (12, 4) and a.A.dtype == torch.float32
    assert not a.A.requires_grad and a.B.requires_grad
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    k = TiedLoRAShared(16, 12, 4, init="kaiming", zero_B=True, seed=0)
    assert k.A.abs().max() <= 16**-0.5 and torch.count_nonzero(k.B) == 0


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((16, 12, 0), {}, ValueError, "rank must be positive"),
        ((16, 12, -2), {}, ValueError, "rank must be positive"),
        ((16, 12, 2.0), {}, TypeError, "rank must be an int"),
        ((16, 12, 2), {"init": "xavier"}, ValueError, "init must be one of"),
        ((16, 12, 2), {"dtype": torch.int32}, TypeError, "floating-point torch.dtype"),
        ((16, 12, 2), {"dtype": "float16"}, TypeError, "floating-point torch.dtype"),
        ((8.0, 8, 2), {}, ValueError, "in_features must be a positive int"),
        ((-3, 8, 2), {}, ValueError, "in_features must be a positive int"),
        ((8, 0, 2), {}, ValueError, "out_features must be a positive int"),
        ((16, 12, 2), {"seed": "a"}, TypeError, "seed must be an int"),
        ((16, 12, 2), {"seed": 1.5}, TypeError, "seed must be an int"),
        ((16, 12, 2), {"train_A": "no"}, TypeError, "train_A must be True or False"),
    ],
)
def test_shared_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        TiedLoRAShared(*args, **kwargs)


def test_a_layer_with_a_pair_of_its_own():
    """``rank=`` instead of ``shared=``: a drop-in nn.Linear that needs nothing else (zero start, float32 pair)."""
    torch.manual_seed(0)
    layer = TiedLoRALinear(10, 6, rank=2)
    assert layer.shared.A.shape == (2, 10) and layer.shared.A.dtype == torch.float32
    x = torch.randn(3, 10)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    linear = nn.Linear(10, 6)
    adapted = TiedLoRALinear.from_linear(linear, rank=4, alpha=8.0)
    assert adapted.weight is linear.weight and adapted.rank == 4 and adapted.scale == 2.0
    assert adapted.shared is not layer.shared
    with pytest.raises(TypeError, match=r"bias must be True or False, got 4 \(rank= and shared= are keyword"):
        TiedLoRALinear(10, 6, 4)
    assert TiedLoRALinear(10, 6, 0, rank=2).bias is None  # what nn.Linear takes still works
    # refused naming the argument, before nn.Linear's own errors (a negative dimension, an int weight)
    for args, kwargs, error, match in (
        ((-1, 6), {}, ValueError, "in_features must be a positive int, got -1"),
        ((10.0, 6), {}, ValueError, "in_features must be a positive int, got 10.0"),
        ((10, 6), {"dtype": torch.int32}, TypeError, "dtype must be a floating-point torch.dtype, got torch.int32"),
    ):
        with pytest.raises(error, match=match):
            TiedLoRALinear(*args, rank=2, **kwargs)
    for kwargs, given in (({}, "got neither"), ({"rank": 2, "shared": TiedLoRAShared(10, 6, 2)}, "not both")):
        with pytest.raises(TypeError, match=f"give the layer shared= .* or rank=.*, {given}"):
            TiedLoRALinear(10, 6, **kwargs)
        with pytest.raises(TypeError, match=f"give the layer shared= .* or rank=.*, {given}"):
            TiedLoRALinear.from_linear(nn.Linear(10, 6), **kwargs)


def test_constructed_like_linear():
    shared = TiedLoRAShared(10, 6, 2)
    layer = TiedLoRALinear(10, 6, bias=False, shared=shared)
    assert isinstance(layer, nn.Linear) and layer.bias is None and layer.weight.shape == (6, 10)
    assert layer.lora_u.shape == (2,) and layer.lora_v.shape == (6,)
    x = torch.randn(3, 10)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight))  # v starts at zero


def test_from_linear_reuses_weight_and_keeps_state_dict_keys():
    linear = nn.Linear(10, 6)
    keys = set(linear.state_dict())
    layer = TiedLoRALinear.from_linear(linear, TiedLoRAShared(10, 6, 2))
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert keys <= set(layer.state_dict())
    x = torch.randn(2, 3, 10)
    # v starts at zero: the adapted layer computes what the base computed, on any leading dims
    assert torch.equal(layer(x), linear(x))


def test_forward_matches_reference_and_gradients_reach_shared():
    shared = TiedLoRAShared(12, 8, 3)
    layer = TiedLoRALinear.from_linear(nn.Linear(12, 8), shared, alpha=6.0)
    _randomised(shared, layer)
    x = torch.randn(5, 12)
    y = layer(x)
    args = (x, layer.weight, layer.bias, shared.A, shared.B, layer.lora_u, layer.lora_v, 2.0)
    assert_close_to_reference(
        y, reference.tied_lora_forward(*args, upcast=True), reference.tied_lora_forward(*args), "y"
    )
    y.sum().backward()
    assert shared.A.grad is not None and shared.B.grad is not None and layer.weight.grad is not None


def test_merge_unmerge():
    linear = nn.Linear(12, 8)
    base = linear.weight.detach().clone()
    shared = TiedLoRAShared(12, 8, 3)
    layer = TiedLoRALinear.from_linear(linear, shared)
    _randomised(shared, layer)
    x = torch.randn(4, 12)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    with torch.no_grad():  # (a training forward of a merged layer warns)
        assert_close_to_reference(layer(x), unmerged.double(), None, "merged forward")
    delta = layer.delta_weight().detach()
    atol = _merge_round_trip_atol(base, delta)
    torch.testing.assert_close(layer.weight, base + delta, rtol=0, atol=atol)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, base, rtol=0, atol=atol)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_a_merged_layer_in_training_warns_that_its_adapter_gets_no_gradient(monkeypatch):
    """A training forward of a merged layer gives its adapter no gradient: with nothing else trained, backward fails
    with PyTorch's generic error; with a trained head beside it, training would go on without the adapter. The
    layer says so. Evaluating merged (eval mode or no_grad), an unmerged layer, or a frozen adapter do not warn.
    Nor does torch log its own warning: torch.fx's ``is_fx_tracing`` logs one at its first call (``_tracing``)."""
    fx_logged = []
    if hasattr(torch.fx._symbolic_trace, "is_fx_tracing_warning"):  # (where torch has it: logs once per process)
        monkeypatch.setattr(torch.fx._symbolic_trace, "is_fx_tracing_warning", lambda: fx_logged.append(1))
    shared = TiedLoRAShared(12, 8, 3)
    layer = TiedLoRALinear.from_linear(nn.Linear(12, 8), shared)
    x = torch.randn(4, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)
        layer.merge()
        with torch.no_grad():
            layer(x)
        layer.eval()
        layer(x)
        layer.train()
    with pytest.warns(UserWarning, match="merged TiedLoRALinear runs in training mode .* unmerge_tied_lora"):
        layer(x)
    layer.requires_grad_(False)  # (the adapter frozen: weight and bias too, which the check does not read)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)
    assert not fx_logged, "torch.fx logged that is_fx_tracing also covers torch.export"


def test_a_merged_layer_in_training_is_traced_without_the_warning():
    """torch.fx and torch.jit.trace trace a merged layer in training mode as before the warning came (fx failed on
    testing a traced parameter's requires_grad; jit.trace warned)."""
    layer = TiedLoRALinear.from_linear(nn.Linear(12, 8), TiedLoRAShared(12, 8, 3))
    layer.merge()
    x = torch.randn(4, 12)
    with torch.no_grad():
        expected = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        traced = torch.fx.symbolic_trace(layer)
        jitted = torch.jit.trace(layer, x, check_trace=False)
    torch.testing.assert_close(traced(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(jitted(x), expected, rtol=0, atol=0)


def test_unmerge_takes_out_what_merge_put_in_after_the_adapter_changed():
    """One layer of a tied pair merged, the pair trained through another layer (or the layer's vectors reset):
    unmerge takes out the ΔW that merge added (merge keeps a copy of its factors), not one recomputed from the
    factors as they are now, which left the difference in the base weight (up to 6.7 in a reviewer's repro). Also
    after a deepcopy and a dtype conversion of the merged layer."""
    shared = TiedLoRAShared(12, 8, 3)
    merged = TiedLoRALinear.from_linear(nn.Linear(12, 8), shared, backend="torch")
    other = TiedLoRALinear(12, 8, shared=shared, backend="torch")
    _randomised(shared, merged)
    _randomised(shared, other)
    base = merged.weight.detach().clone()
    merged_deltas = []

    def merge():  # (merge, keeping the ΔW it adds)
        merged_deltas.append(merged.delta_weight().detach())
        merged.merge()

    def atol():
        return _merge_round_trip_atol(base, *merged_deltas)

    merge()
    before = shared.A.detach().clone()
    optimizer = torch.optim.SGD([shared.A, shared.B, other.lora_v], lr=0.05)
    other(torch.randn(4, 12)).sum().backward()
    optimizer.step()
    assert (shared.A - before).abs().max() > 0.1  # (the ΔW of the factors now differs by that much or more)
    copied = copy.deepcopy(merged).double()
    merged.unmerge()
    torch.testing.assert_close(merged.weight, base, rtol=0, atol=atol())
    copied.unmerge()
    torch.testing.assert_close(copied.weight, base.double(), rtol=0, atol=atol())
    merge()
    merged.reset_adapter()  # u and v back at their start values
    merged.unmerge()
    torch.testing.assert_close(merged.weight, base, rtol=0, atol=atol())
    # a merged state loaded into a merged layer: its weight holds the loaded factors' ΔW, which unmerge takes out
    _randomised(shared, merged, seed=1)  # (reset_adapter left v at zero: no ΔW)
    merge()
    state = copy.deepcopy(merged.state_dict())
    merged.unmerge()
    with torch.no_grad():
        shared.A.add_(1.0)
        merged.lora_v.mul_(2.0)
    merge()
    merged.load_state_dict(state)
    merged.unmerge()
    torch.testing.assert_close(merged.weight, base, rtol=0, atol=atol())


def test_a_load_without_the_weight_keeps_what_merge_put_in():
    """A state dict without the layer's weight (its adapter factors alone, a key of another module) loaded while
    merged leaves the weight as merge made it, so unmerge takes out that ΔW: the copy merge kept was dropped at any
    load, and unmerge then took out the ΔW of the factors as they were (0.14-0.25 left in the base weights of a
    reviewer's tiny LLaMA)."""
    shared = TiedLoRAShared(12, 8, 3)
    layer = TiedLoRALinear.from_linear(nn.Linear(12, 8), shared, backend="torch")
    _randomised(shared, layer)
    base = layer.weight.detach().clone()
    other = TiedLoRALinear(12, 8, shared=TiedLoRAShared(12, 8, 3), backend="torch")
    _randomised(other.shared, other, seed=1)
    atol = _merge_round_trip_atol(base, layer.delta_weight().detach(), other.delta_weight().detach())
    adapter = {k: v for k, v in other.state_dict().items() if k not in ("weight", "bias")}
    for load in ({}, adapter):
        layer.merge()
        layer.reset_adapter()
        layer.load_state_dict(load, strict=False)
        layer.unmerge()
        torch.testing.assert_close(layer.weight, base, rtol=0, atol=atol)
    torch.testing.assert_close(layer.shared.A, other.shared.A)  # (the adapter was loaded)


def test_alpha_can_be_changed_and_scale_follows_it(tmp_path):
    """``alpha`` set after construction changes the scale that forward, merge, save and export use (it was a plain
    attribute: the output kept the old scale while saves recorded the new alpha); ``scale`` is read-only; not while
    merged (the weight holds ΔW at the old scale)."""
    import pickle

    shared = TiedLoRAShared(12, 8, 4)
    layer = TiedLoRALinear.from_linear(nn.Linear(12, 8), shared, backend="torch")
    _randomised(shared, layer)
    x = torch.randn(3, 12)
    base_out = nn.functional.linear(x, layer.weight, layer.bias)
    term = layer(x) - base_out  # alpha = rank: scale 1
    layer.alpha = 8.0
    assert layer.scale == 2.0 and "alpha=8" in repr(layer)
    torch.testing.assert_close(layer(x) - base_out, 2 * term)
    layer.merge()  # weight holds ΔW at scale 2: a new alpha is refused until unmerge
    with pytest.raises(RuntimeError, match="merged .* unmerge"):
        layer.alpha = 2.0
    layer.alpha = 8  # (the same alpha passes)
    layer.unmerge()
    layer.alpha = 2.0
    assert layer.scale == 0.5
    layer.alpha = None  # the constructor's default: the rank
    assert (layer.alpha, layer.scale) == (4.0, 1.0)
    with pytest.raises(AttributeError, match="set alpha instead"):
        layer.scale = 3.0
    for bad, error in ((0.0, ValueError), (float("nan"), ValueError), ("2", TypeError), (True, TypeError)):
        with pytest.raises(error, match="alpha must be"):
            layer.alpha = bad
    assert layer.alpha == 4.0
    layer.alpha = 6
    assert pickle.loads(pickle.dumps(layer)).scale == 1.5 and copy.deepcopy(layer).alpha == 6.0
    # a layer pickled before alpha became a property (alpha and scale in its __dict__) unpickles with the scale it
    # ran with: alpha / rank, or a scale set by hand (forward read scale alone)
    state = {k: v for k, v in layer.__dict__.items() if k != "_alpha"}
    for alpha, scale, now in ((2.0, 0.5, 2.0), (4.0, 3.0, 12.0)):
        old = TiedLoRALinear.__new__(TiedLoRALinear)
        old.__setstate__({**state, "alpha": alpha, "scale": scale})
        assert (old.alpha, old.scale) == (now, scale) and "scale" not in old.__dict__


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_setting_the_dropout_child_to_a_number_names_lora_dropout(p):
    """``dropout`` is the constructor's keyword but the layer's attribute of that name is its ``nn.Dropout`` child
    (there while p > 0): a number assigned to it was kept as an unused attribute (p = 0: no dropout, silently) or
    refused by ``nn.Module`` as "cannot assign 'float' as child module"; it now names ``lora_dropout``."""
    layer = TiedLoRALinear(16, 8, rank=4, dropout=p, backend="torch")
    with pytest.raises(TypeError, match=r"layer\.lora_dropout = 0\.5"):
        layer.dropout = 0.5
    assert layer.lora_dropout == p
    layer.lora_dropout = 0.5
    assert layer.lora_dropout == 0.5 and isinstance(layer.dropout, nn.Dropout)


def test_torch_jit_trace():
    # torch.jit.trace (and the TorchScript ONNX exporter built on it) records sizes as tensors: the checks take them
    layer = TiedLoRALinear.from_linear(nn.Linear(12, 8), TiedLoRAShared(12, 8, 3)).eval()
    _randomised(layer.shared, layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the checks' Python branches, as expected
        traced = torch.jit.trace(layer, (torch.randn(4, 12),))
    x = torch.randn(5, 12)
    assert torch.equal(traced(x), layer(x))
    layer.backend = "triton"  # ("auto" traces the torch path on a GPU too)
    with pytest.raises(RuntimeError, match="backend='triton' cannot be traced by torch.jit.trace"):
        torch.jit.trace(layer, (x,))


def test_merge_refuses_a_computed_weight():
    # a parametrization (or pruning's pre-hook) added after adapting recomputes `weight` at every forward: ΔW
    # written into it would vanish while merged says True, and unloading could not hand back a parameter
    from torch.nn.utils import parametrizations

    layer = TiedLoRALinear.from_linear(nn.Linear(12, 8), TiedLoRAShared(12, 8, 3))
    _randomised(layer.shared, layer)
    layer.merge()
    parametrizations.weight_norm(layer)
    for method, what in ((layer.unmerge, "unmerge"), (layer.to_base, "unload it")):
        with pytest.raises(RuntimeError, match=f"weight is computed .*remove that before you {what}"):
            method()
    assert layer.merged
    layer = TiedLoRALinear.from_linear(nn.Linear(12, 8), TiedLoRAShared(12, 8, 3))
    parametrizations.weight_norm(layer)
    with pytest.raises(RuntimeError, match="weight is computed .*remove that before you merge"):
        layer.merge()
    assert not layer.merged


def test_merge_bfloat16_rounds_once():
    linear = nn.Linear(32, 16).bfloat16()
    base = linear.weight.detach().clone()
    shared = TiedLoRAShared(32, 16, 4)
    layer = TiedLoRALinear.from_linear(linear, shared)
    _randomised(shared, layer)
    layer.merge()
    exact = base.float() + layer.delta_weight()
    assert torch.equal(layer.weight, exact.bfloat16())


def test_delta_weight_and_extra_repr():
    shared = TiedLoRAShared(12, 8, 3, train_A=False, train_B=False)
    layer = TiedLoRALinear.from_linear(nn.Linear(12, 8), shared, train_u=True, train_v=True)
    _randomised(shared, layer)
    expected = torch.diag(layer.lora_v) @ shared.B @ torch.diag(layer.lora_u) @ shared.A
    torch.testing.assert_close(layer.delta_weight(), expected)
    text = repr(layer)
    assert "rank=3" in text and "trains=u+v" in text and "merged=False" in text


def test_frozen_unit_vectors_cost_no_memory():
    layer = TiedLoRALinear.from_linear(
        nn.Linear(6, 4), TiedLoRAShared(6, 4, 2), train_u=False, train_v=False, v_init=1.0
    )
    assert layer.lora_u is None and layer.lora_v is None


def test_layers_sharing_one_pair_stay_tied_through_conversions():
    shared = TiedLoRAShared(8, 8, 2)
    model = nn.Sequential(*(TiedLoRALinear.from_linear(nn.Linear(8, 8), shared) for _ in range(3)))
    assert sum(p is shared.A for p in model.parameters()) == 1
    model.double()
    assert all(layer.shared.A is model[0].shared.A for layer in model)
    assert model[0].shared.A.dtype == torch.float64
    clone = copy.deepcopy(model)
    assert clone[1].shared.A is clone[2].shared.A and clone[1].shared.A is not model[1].shared.A
    model.half()
    assert model[2].shared.B.dtype == torch.float16 and model[2].shared.B is model[0].shared.B
    model.to("meta")  # a device move (as .cuda() would be) keeps the parameter objects, hence the tie
    assert model[1].shared.A.is_meta and model[1].shared.A is model[0].shared.A


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"b_rows": (0, 5)}, "reads rows"),
        ({"backend": "gpu"}, "backend must be one of"),
        ({"share_u_with": "q_proj"}, "share_u_with must be a TiedLoRALinear of the same rank"),
        ({"alpha": 0.0}, "alpha must be a positive finite number"),
        ({"alpha": float("nan")}, "alpha must be a positive finite number"),
        ({"alpha": 1e308}, r"alpha / rank within float32"),
        ({"v_init": float("inf")}, "v_init must be a finite number"),
        ({"u_init": float("nan")}, "u_init must be a finite number"),
        ({"u_init": "1"}, "u_init must be a finite number"),
        # ints beyond any float: refused by name, not an OverflowError from their conversion
        ({"alpha": 10**400}, "alpha must be a positive finite number"),
        ({"v_init": 10**400}, "v_init must be a finite number"),
        ({"u_init": -(10**400)}, "u_init must be a finite number"),
    ],
)
def test_layer_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TiedLoRALinear.from_linear(nn.Linear(6, 4), TiedLoRAShared(6, 4, 2), **kwargs)


def test_layer_type_errors():
    with pytest.raises(TypeError, match="needs an nn.Linear"):
        TiedLoRALinear.from_linear(nn.Conv1d(6, 4, 1), TiedLoRAShared(6, 4, 2))

    class Linear(nn.Module):  # another library's "Linear" (PEFT's LoRA layer is one): named in full
        pass

    with pytest.raises(TypeError, match=r"got \S*test_modules\.test_layer_type_errors\.<locals>\.Linear"):
        TiedLoRALinear.from_linear(Linear(), TiedLoRAShared(6, 4, 2))
    with pytest.raises(TypeError, match="shared must be a TiedLoRAShared"):
        TiedLoRALinear.from_linear(nn.Linear(6, 4), nn.Linear(6, 4))
    with pytest.raises(TypeError, match="alpha must be a number"):
        TiedLoRALinear.from_linear(nn.Linear(6, 4), TiedLoRAShared(6, 4, 2), alpha="2")
    with pytest.raises(ValueError, match="in_features=7"):
        TiedLoRALinear.from_linear(nn.Linear(7, 4), TiedLoRAShared(6, 4, 2))
    for kwargs, match in (
        ({"b_rows": (0.0, 4.0)}, "b_rows must be a"),
        ({"b_rows": (0, 2, 4)}, "b_rows must be a"),
        ({"train_u": "no"}, "train_u must be True or False"),
        ({"train_v": "no"}, "train_v must be True or False"),
    ):
        with pytest.raises(TypeError, match=match):
            TiedLoRALinear.from_linear(nn.Linear(6, 4), TiedLoRAShared(6, 4, 2), **kwargs)
    misspelt = r"unexpected keyword argument\(s\) \['trian_u'\]; the adapter takes \['alpha', 'b_rows', 'backend', "
    with pytest.raises(TypeError, match=misspelt):
        TiedLoRALinear.from_linear(nn.Linear(6, 4), TiedLoRAShared(6, 4, 2), trian_u=False)
    with pytest.raises(TypeError, match=misspelt):
        TiedLoRALinear(6, 4, rank=2, trian_u=False)
    # the keywords as typed for IDEs and type checkers (**adapter: Unpack[AdapterOptions]) are those taken
    taken = inspect.signature(TiedLoRALinear._init_adapter).parameters
    assert list(AdapterOptions.__annotations__) == [k for k in taken if k not in ("self", "shared")]
    for method in (TiedLoRALinear.__init__, TiedLoRALinear.from_linear):
        assert inspect.signature(method).parameters["adapter"].annotation == "Unpack[AdapterOptions]"
        assert typing.get_type_hints(method)["adapter"] == Unpack[AdapterOptions]  # (CLI and validation tools)
    with pytest.raises(TypeError, match="TiedLoRAConv1D.from_linear got a Linear: use TiedLoRALinear.from_linear"):
        TiedLoRAConv1D.from_linear(nn.Linear(6, 6), TiedLoRAShared(6, 6, 2))  # would read W transposed
    linear = nn.Linear(6, 4)
    linear.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="v_init"):
        TiedLoRALinear.from_linear(linear, TiedLoRAShared(6, 4, 2), v_init=float("inf"))
    assert len(linear._forward_hooks) == 1  # a refused adapt leaves the linear as it was
    layer = TiedLoRALinear.from_linear(nn.Linear(6, 4), TiedLoRAShared(6, 4, 2))
    with pytest.raises(TypeError, match="already has a Tied-LoRA adapter"):
        TiedLoRALinear.from_linear(layer, TiedLoRAShared(6, 4, 2))


def test_share_u_with_checks_rank_and_training():
    frozen = TiedLoRALinear.from_linear(nn.Linear(6, 4), TiedLoRAShared(6, 4, 2), train_u=False, u_init=0.5)
    with pytest.raises(ValueError, match="share_u_with is frozen, but train_u=True"):
        TiedLoRALinear.from_linear(nn.Linear(6, 4), TiedLoRAShared(6, 4, 2), share_u_with=frozen)
    with pytest.raises(ValueError, match="same rank"):
        TiedLoRALinear.from_linear(nn.Linear(6, 4), TiedLoRAShared(6, 4, 3), share_u_with=frozen, train_u=False)
    with pytest.raises(ValueError, match="starts at 0.5, but u_init=5.0"):
        TiedLoRALinear.from_linear(
            nn.Linear(6, 4), TiedLoRAShared(6, 4, 2), share_u_with=frozen, train_u=False, u_init=5.0
        )
    shared = TiedLoRAShared(6, 4, 2)
    q = TiedLoRALinear.from_linear(nn.Linear(6, 4), shared)
    k = TiedLoRALinear.from_linear(nn.Linear(6, 4), shared, share_u_with=q)
    assert k.lora_u is q.lora_u


def test_ties_survive_overwrite_on_conversion():
    """With torch.__future__'s overwrite-on-conversion every module gets new parameter objects: ties hold
    because tied tensors belong to one module (shared pair, shared u), never to several."""
    shared = TiedLoRAShared(8, 8, 2)
    q = TiedLoRALinear.from_linear(nn.Linear(8, 8), shared)
    k = TiedLoRALinear.from_linear(nn.Linear(8, 8), shared, share_u_with=q)
    model = nn.ModuleDict({"q": q, "k": k})
    old = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(old)
    assert model["q"].lora_u is model["k"].lora_u and model["q"].shared.A is model["k"].shared.A
    assert model["k"].lora_u.dtype == torch.float64


def test_meta_init_then_reset_keeps_the_zero_start():
    """The meta-device flow (build on meta, to_empty, reset_parameters) restores every start value."""
    with torch.device("meta"):
        shared = TiedLoRAShared(8, 6, 2, init="kaiming", zero_B=True, seed=0)
        layer = TiedLoRALinear(8, 6, shared=shared, train_u=True, train_v=True, u_init=0.5, v_init=0.25)
    layer.to_empty(device="cpu")
    for m in layer.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    assert torch.count_nonzero(shared.B) == 0 and torch.equal(
        shared.A, TiedLoRAShared(8, 6, 2, init="kaiming", seed=0).A
    )
    assert torch.all(layer.lora_u == 0.5) and torch.all(layer.lora_v == 0.25)


@pytest.mark.parametrize(
    "adapter",
    [dict(), dict(train_v=False), dict(train_v=False, train_u=False), dict(v_init=0.5), dict(train_u=False)]
    + [dict(v_init=0.5, u_init=0.0), dict(train_v=False, u_init=0.0)],
    ids=["defaults", "frozen_v", "frozen_uv", "v_half", "frozen_u", "u_zero", "frozen_v_u_zero"],
)
def test_a_layer_with_a_pair_of_its_own_starts_at_zero_and_trains(adapter):
    """``rank=``: whatever the layer's flags, it computes its base layer at the start (exactly one factor at zero:
    v or u when it starts there, else B) and its trained factors get a gradient. A frozen v starts at one by
    default (``v_init=None``), not stored. Before, ``train_v=False`` froze v at zero: no gradient ever."""
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no warning that it cannot train)
        layer = TiedLoRALinear(16, 8, rank=4, backend="torch", **adapter)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert (layer.lora_v is None) == (adapter.get("train_v", True) is False)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    layer(x).square().sum().backward()
    trained = [p for p in layer.parameters() if p.requires_grad]
    assert any(p.grad.abs().sum() > 0 for p in trained)


def test_a_start_that_cannot_train_warns():
    """Each factor's gradient is a product of the other three: two factors at zero, or one frozen at zero, leave
    every gradient zero for good. Building such a layer warns, naming them; the one-zero starts do not."""
    lora_pair = TiedLoRAShared(16, 8, 4, init="kaiming", zero_B=True)
    with pytest.warns(UserWarning, match="B and v start at zero: every gradient of the adapter"):
        layer = TiedLoRALinear(16, 8, shared=lora_pair)  # a trained v starts at zero too
    layer(torch.randn(3, 16)).sum().backward()
    adapter = [p for n, p in layer.named_parameters() if n.startswith(("shared.", "lora_"))]
    assert len(adapter) == 4 and all(p.grad is not None and not p.grad.any() for p in adapter)
    with pytest.warns(UserWarning, match="v starts frozen at zero"):
        TiedLoRALinear(16, 8, rank=4, train_v=False, v_init=0.0)
    with pytest.warns(UserWarning, match="u starts frozen at zero"):
        TiedLoRALinear(16, 8, shared=TiedLoRAShared(16, 8, 4), train_u=False, u_init=0.0, v_init=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TiedLoRALinear(16, 8, shared=lora_pair, train_u=False, train_v=False)  # LoRA: B alone at zero, trained
        TiedLoRALinear(16, 8, shared=TiedLoRAShared(16, 8, 4, train_A=False, train_B=False))  # VeRA-like


def test_numpy_integers_and_bools_are_accepted():
    """Sizes, seeds, rows and flags computed with numpy work like Python's (and are stored as Python ints)."""
    np = pytest.importorskip("numpy")
    shared = TiedLoRAShared(np.int64(8), np.int64(6), np.int64(2), seed=np.int64(3))
    assert type(shared.rank) is int and shared.A.shape == (2, 8)
    layer = TiedLoRALinear.from_linear(nn.Linear(8, 4), shared, b_rows=(np.int64(2), np.int64(6)))
    assert layer.b_rows == (2, 6)
    x = torch.randn(3, 8)
    args = (layer.weight, layer.bias, shared.A, layer.lora_B, layer.lora_u, layer.lora_v)
    assert torch.equal(tied_lora_linear(x, *args, deterministic=np.bool_(True)), layer(x))
    config = TiedLoRAConfig(rank=np.int64(4), seed=np.int64(1))
    assert type(config.rank) is int and type(config.seed) is int


def test_frozen_u_and_v_that_are_not_one_are_kept_and_applied():
    """train_u/train_v=False with a start value other than one keeps a frozen vector holding it (only a vector
    frozen at exactly one is None), and ΔW applies it."""
    layer = TiedLoRALinear.from_linear(
        nn.Linear(6, 4), TiedLoRAShared(6, 4, 2), train_u=False, u_init=0.5, train_v=False, v_init=2.0
    )
    assert layer.lora_u is not None and not layer.lora_u.requires_grad and torch.all(layer.lora_u == 0.5)
    assert layer.lora_v is not None and not layer.lora_v.requires_grad and torch.all(layer.lora_v == 2.0)
    unit = reference.delta_weight(layer.shared.A, layer.shared.B, None, None, layer.scale)
    torch.testing.assert_close(layer.delta_weight(), 0.5 * 2.0 * unit)


def test_from_linear_and_to_base_keep_the_module_mode():
    """An eval-mode linear gives an eval-mode layer (its adapter dropout stays off), and unloading keeps the mode."""
    layer = TiedLoRALinear.from_linear(nn.Linear(6, 4).eval(), TiedLoRAShared(6, 4, 2), dropout=0.5)
    assert not layer.training
    assert not layer.to_base().training
    layer = TiedLoRALinear.from_linear(nn.Linear(6, 4).eval(), TiedLoRAShared(6, 4, 2)).train()
    assert layer.to_base().training


def test_layer_reset_parameters_redraws_its_pair():
    """A layer's own reset_parameters (the meta-device flow, called on the layer alone) draws its shared pair
    again, not only u and v."""
    with torch.device("meta"):
        layer = TiedLoRALinear(8, 6, shared=TiedLoRAShared(8, 6, 2, seed=5))
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    fresh = TiedLoRAShared(8, 6, 2, seed=5)
    assert torch.equal(layer.shared.A, fresh.A) and torch.equal(layer.shared.B, fresh.B)
    assert torch.all(layer.lora_u == 1) and torch.all(layer.lora_v == 0)


def test_gaussian_and_kaiming_draws_have_their_scales():
    """init="gaussian" draws N(0, 1) (the Tied-LoRA authors' code); "kaiming" is uniform within 1/sqrt(in)."""
    g = TiedLoRAShared(64, 64, 16, init="gaussian", seed=0)
    for t in (g.A, g.B):
        assert abs(t.mean().item()) < 0.1 and 0.9 < t.std().item() < 1.1
    k = TiedLoRAShared(64, 64, 16, init="kaiming", seed=0)
    assert 0.9 * 64**-0.5 < k.A.abs().max() <= 64**-0.5 and 0.9 * 16**-0.5 < k.B.abs().max() <= 16**-0.5


def test_b_rows_must_span_exactly_out_features():
    """b_rows inside shared B but of another width than the layer's out_features is refused when the layer is
    built, not at its first forward."""
    for rows in ((0, 3), (1, 4), (2, 2)):
        with pytest.raises(ValueError, match="reads rows"):
            TiedLoRALinear.from_linear(nn.Linear(6, 4), TiedLoRAShared(6, 8, 2), b_rows=rows)
    # rows of a grouped B fewer than the shared rank (a narrow k_proj beside q_proj) are accepted, as PEFT accepts a
    # rank above a layer's width: that layer's update has rank 4 at most
    shared = TiedLoRAShared(32, 24, 8, seed=0)
    layer = TiedLoRALinear.from_linear(nn.Linear(32, 4), shared, v_init=1.0, b_rows=(20, 24))
    x = torch.randn(3, 32)
    expected = reference.tied_lora_forward(
        x, layer.weight, layer.bias, shared.A, shared.B[20:24], layer.lora_u, layer.lora_v
    )
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=cpu_triton)])
def test_falcon_linear_keeps_its_bias_apart(backend):
    """transformers' FalconLinear adds its bias after the product is rounded (two roundings, kept on purpose):
    adapted, with the adapter at zero, it computes the FalconLinear bit for bit on the torch path (F.linear, one
    rounding, would not: checked on the same data); with an adapter, output and gradients match the reference
    with the bias added apart, and unloading gives a FalconLinear back."""
    falcon_linear = pytest.importorskip("transformers.models.falcon.modeling_falcon").FalconLinear
    torch.manual_seed(0)
    base = falcon_linear(256, 128, bias=True)
    with torch.no_grad():
        base.bias.mul_(10)
    x = torch.randn(3, 64, 256)
    one_rounding_differs = []
    for dtype in (torch.bfloat16, torch.float32):
        linear = copy.deepcopy(base).to(dtype)
        layer = TiedLoRALinear.from_linear(copy.deepcopy(linear), rank=4, backend="torch")
        assert type(layer).__name__ == "TiedLoRAFalconLinear" and layer.lora_v is not None
        expected = linear(x.to(dtype))
        assert torch.equal(layer(x.to(dtype)), expected)
        one_rounding_differs.append(
            not torch.equal(torch.nn.functional.linear(x.to(dtype), linear.weight, linear.bias), expected)
        )
    # the data tells the two apart in some dtype: in bf16 (on a Xeon with AMX, torch 2.13's float32 F.linear was
    # seen adding the bias after the product is rounded too, so there float32 cannot)
    assert any(one_rounding_differs)

    layer = TiedLoRALinear.from_linear(copy.deepcopy(base), rank=4, backend=backend)
    _randomised(layer.shared, layer)
    xg = x[0].clone().requires_grad_(True)
    y = layer(xg)
    dy = torch.randn_like(y)
    names = ("x", "A", "B", "u", "v")
    tensors = (xg, layer.shared.A, layer.shared.B, layer.lora_u, layer.lora_v)
    got = torch.autograd.grad(y, tensors, dy)
    args = (layer.weight, None, layer.shared.A, layer.shared.B, layer.lora_u, layer.lora_v, layer.scale)
    ref = reference.tied_lora_forward(xg.double(), *(t.double() if t is not None else t for t in args[:-1]), args[-1])
    ref = ref + layer.bias.double()
    assert_close_to_reference(y, ref, None, "y")
    want = torch.autograd.grad(ref, tensors, dy.double())
    for name, g, w in zip(names, got, want, strict=True):
        assert_close_to_reference(g, w, None, f"d{name}")
    assert type(layer.to_base()) is falcon_linear
