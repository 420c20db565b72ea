"""``torch.compile`` over the triton backend.

Dynamo cannot trace the kernels' launchers, so under ``torch.compile`` the fused forward and backward run as
two custom ops (``tied_lora_kernels::forward`` / ``::backward``, ``kernels/function.py``) with shape-only fake
implementations. A compiled function or model must trace in one graph (``fullgraph=True``), call those ops,
and compute what eager computes bit for bit (the same kernels run; deterministic reductions), gradients of
tied layers included, with each hook on the shared ``A`` firing once per backward.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from tests.conftest import DEVICE
from tests.models import Toy
from tests.test_kernels_parity import make_inputs
from tied_lora_kernels import TiedLoRAConfig, TiedLoRALinear, TiedLoRAShared, apply_tied_lora
from tied_lora_kernels.functional import tied_lora_linear
from tied_lora_kernels.kernels import function

FORWARD_OP = torch.ops.tied_lora_kernels.forward.default


class GraphRecorder:
    """A dynamo backend that records the ops of each graph it is given, then runs it with ``aot_eager``."""

    def __init__(self):
        self.graphs = 0
        self.targets: list = []

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        self.targets += [node.target for node in gm.graph.nodes if node.op == "call_function"]
        return lookup_backend("aot_eager")(gm, example_inputs)


def compiled(fn, backend):
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True)


def run(fn, x, inputs):
    """``fn(x)``, and the gradient of a fixed random projection of it for every input that requires one."""
    y = fn(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype).to(DEVICE)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return y, torch.autograd.grad(y, wanted, dy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [5, 37], ids=["decode", "prefill"])
@pytest.mark.parametrize("config", ["lora", "tl6", "vera", "full", "v_only", "base_only"])
def test_compiled_function_equals_eager(config, M, dtype):
    x, params = make_inputs(config, M, 40, 24, 6, dtype, bias=config != "lora")
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]

    def f(h):
        return tied_lora_linear(h, *args, 0.5, backend="triton", deterministic=True)

    y, grads = run(f, x, [x, *args])
    recorder = GraphRecorder()
    y_c, grads_c = run(compiled(f, recorder), x, [x, *args])
    assert recorder.graphs == 1 and FORWARD_OP in recorder.targets
    assert torch.equal(y_c, y)
    assert len(grads_c) == len(grads)
    for got, want in zip(grads_c, grads, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("M", [5, 37], ids=["decode", "prefill"])
def test_compiled_dropout_equals_eager(M):
    """The custom ops draw the mask as eager does (the same seed from the same generator) and carry its bits
    to the backward: output and gradients equal eager's bit for bit."""
    x, params = make_inputs("tl6", M, 40, 24, 6, torch.bfloat16)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]

    def f(h):
        return tied_lora_linear(h, *args, 0.5, backend="triton", deterministic=True, dropout=0.3)

    torch.manual_seed(2)
    y, grads = run(f, x, [x, *args])
    recorder = GraphRecorder()
    torch.manual_seed(2)
    y_c, grads_c = run(compiled(f, recorder), x, [x, *args])
    assert recorder.graphs == 1 and FORWARD_OP in recorder.targets
    assert torch.equal(y_c, y)
    for got, want in zip(grads_c, grads, strict=True):
        assert torch.equal(got, want)


def test_compiled_dropout_draws_a_mask_per_call():
    """Two identical calls in one compiled graph draw two masks, as in eager (the seed is drawn in the graph,
    outside the custom op, so the graph's common-subexpression pass cannot merge the calls)."""
    x, params = make_inputs("tl6", 20, 40, 24, 6, torch.float32)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]

    def f(h):
        y1 = tied_lora_linear(h, *args, 0.5, backend="triton", dropout=0.5)
        return y1, tied_lora_linear(h, *args, 0.5, backend="triton", dropout=0.5)

    y1, y2 = compiled(f, "aot_eager")(x)
    assert not torch.equal(y1, y2)


def test_compiled_checkpointed_dropout_equals_eager():
    """A checkpointed region the compiled graph recomputes for the backward redraws the forward's mask (the
    seed is an input of the custom op, drawn once in the graph), so the gradients equal eager's bit for bit."""
    x, params = make_inputs("tl6", 20, 40, 24, 6, torch.float32)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]

    def inner(h):
        return torch.tanh(tied_lora_linear(h, *args, 0.5, backend="triton", deterministic=True, dropout=0.3))

    def f(h):
        return torch.utils.checkpoint.checkpoint(inner, h, use_reentrant=False)

    torch.manual_seed(4)
    y, grads = run(f, x, [x, *args])
    torch.manual_seed(4)
    y_c, grads_c = run(compiled(f, "aot_eager"), x, [x, *args])
    assert torch.equal(y_c, y)
    for got, want in zip(grads_c, grads, strict=True):
        assert torch.equal(got, want)


def test_compiled_no_grad_and_3d_input():
    x, params = make_inputs("tl6", 6, 40, 24, 6, torch.float32, lead=(2, 3))
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]

    def f(h):
        return tied_lora_linear(h, *args, 0.5, backend="triton")

    with torch.no_grad():
        y = f(x)
        y_c = compiled(f, GraphRecorder())(x)
    assert y_c.shape == (2, 3, 24) and torch.equal(y_c, y)


def test_compiling_warns_nothing():
    """Dynamo says nothing about the library's code while tracing it (a ``functools.cache`` on the path to the
    kernels once made it warn at every compile that it traced through the cache)."""
    x, params = make_inputs("tl6", 37, 40, 24, 6, torch.float32)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]

    def f(h):
        return tied_lora_linear(h, *args, 0.5, backend="triton")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(compiled(f, GraphRecorder()), x, [x, *args])
    # (not dynamo's advice about the interpreter itself: "Guards may run slower on Python 3.13.0 ...")
    said = [str(w.message) for w in caught if "_dynamo" in w.filename]
    assert [m for m in said if not m.startswith("Guards may run slower on Python")] == []


def test_a_merged_layer_in_training_compiles_in_one_graph():
    """The warning of a merged layer's training forward is eager's: under torch.compile it would break the graph
    (fullgraph fails on it)."""
    layer = TiedLoRALinear.from_linear(torch.nn.Linear(12, 8), TiedLoRAShared(12, 8, 3)).to(DEVICE)
    layer.merge()
    x = torch.randn(4, 12, device=DEVICE)
    with torch.no_grad():
        expected = layer(x)
    assert torch.equal(torch.compile(layer, fullgraph=True, backend="eager")(x), expected)


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_torch_backend_compiles_in_one_graph(autocast):
    """The torch path too (what CPU users run): one graph, eager's results."""
    x, params = make_inputs("tl6", 37, 40, 24, 6, torch.float32)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]

    def f(h):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            return tied_lora_linear(h, *args, 0.5, backend="torch")

    y, grads = run(f, x, [x, *args])
    recorder = GraphRecorder()
    y_c, grads_c = run(compiled(f, recorder), x, [x, *args])
    assert recorder.graphs == 1
    assert y_c.dtype == y.dtype and torch.allclose(y_c, y)
    for got, want in zip(grads_c, grads, strict=True):
        assert torch.allclose(got, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dynamic_shapes_and_scale(backend):
    """``dynamic=True`` makes M and the scale symbolic: no graph break (``fullgraph``), eager's results for each
    call. (Both backends then specialise on the scale's value: a new scale recompiles, a new M does not.)"""
    _, params = make_inputs("tl6", 20, 40, 24, 6, torch.float32)
    args = [params[k].detach() for k in ("weight", "bias", "A", "B", "u", "v")]

    def f(h, scale):
        return tied_lora_linear(h, *args, scale, backend=backend, deterministic=True)

    torch._dynamo.reset()
    recorder = GraphRecorder()
    f_c = torch.compile(f, backend=recorder, dynamic=True, fullgraph=True)
    graphs = []
    for M, scale in ((20, 0.5), (37, 0.5), (29, 0.7)):
        x = torch.randn(M, 40, generator=torch.Generator().manual_seed(M)).to(DEVICE)
        assert torch.equal(f_c(x, scale), f(x, scale))
        graphs.append(recorder.graphs)
    assert graphs[0] >= 1 and graphs[1] == graphs[0], graphs  # another M: the same graph


def test_inductor_runs_the_custom_op():
    x, params = make_inputs("tl6", 37, 40, 24, 6, torch.float32)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]

    def f(h):
        return tied_lora_linear(h, *args, 0.5, backend="triton", deterministic=True)

    y, grads = run(f, x, [x, *args])
    y_c, grads_c = run(compiled(f, "inductor"), x, [x, *args])
    assert torch.equal(y_c, y)
    for got, want in zip(grads_c, grads, strict=True):
        assert torch.equal(got, want)


def test_compiled_model_with_tied_layers():
    """A model whose layers share A and B, compiled whole: the same gradients, each hook once per backward."""

    def build():
        model = Toy().to(DEVICE)
        return apply_tied_lora(model, TiedLoRAConfig(rank=4, preset="tl6", init="kaiming", backend="triton"))

    def step(model, fn):
        shared = next(m for m in model.modules() if isinstance(m, TiedLoRAShared))
        fired = []
        handle = shared.A.register_post_accumulate_grad_hook(lambda p: fired.append(p.grad.clone()))
        x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(5)).to(DEVICE)
        fn(x).square().mean().backward()
        handle.remove()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, fired

    eager_model, compiled_model = build(), build()
    with torch.no_grad():  # v starts at 0 (zero start): give the adapter a non-zero output first
        for m in (eager_model, compiled_model):
            torch.manual_seed(1)
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
    grads, fired = step(eager_model, eager_model)
    recorder = GraphRecorder()
    grads_c, fired_c = step(compiled_model, compiled(compiled_model, recorder))
    assert recorder.graphs == 1 and recorder.targets.count(FORWARD_OP) == 9  # 3 blocks x q, k, v
    assert len(fired) == len(fired_c) == 1 and torch.equal(fired_c[0], fired[0])
    assert grads_c.keys() == grads.keys()
    for name in grads:
        assert torch.equal(grads_c[name], grads[name]), name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_export(backend):
    """``torch.export`` of an adapted model: the triton path is exported as its custom op; the exported program
    computes eager's output bit for bit, with the batch size a dynamic dimension, also saved and loaded."""
    torch.manual_seed(0)
    model = apply_tied_lora(Toy().to(DEVICE), TiedLoRAConfig(rank=4, preset="tl6", init="kaiming", backend=backend))
    with torch.no_grad():  # v starts at 0 (zero start): give the adapter a non-zero output first
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    x = torch.randn(2, 9, 24, device=DEVICE)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    ops = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert ops.count(FORWARD_OP) == (9 if backend == "triton" else 0)  # 3 blocks x q, k, v
    buffer = io.BytesIO()
    torch.export.save(program, buffer)  # (the custom op serialises by name)
    buffer.seek(0)
    program = torch.export.load(buffer)
    for batch in (2, 5):
        x = torch.randn(batch, 9, 24, device=DEVICE)
        with torch.no_grad():
            assert torch.equal(program.module()(x), model(x))


def test_opcheck():
    """torch.library's own checks of both ops: schema, fake (shape) implementation, autograd registration and
    tracing with dynamic shapes."""
    x, params = make_inputs("full", 20, 40, 24, 6, torch.float32)
    w, b, A, B, u, v = (params[k] for k in ("weight", "bias", "A", "B", "u", "v"))
    forced = (None, None, None)
    torch.library.opcheck(function._forward_op, (x, w, b, A, B, u, v, 0.5, True, 0.0, None, True, True, *forced))
    # only x trains (the flags say so): no T kept, no x saved
    frozen = (w.detach(), None, A.detach(), B.detach(), None, None)
    torch.library.opcheck(function._forward_op, (x, *frozen, 1.0, True, 0.0, None, False, False, *forced))
    # adapter dropout: the mask drawn from the seed passed in, its bits a third output
    seed = torch.tensor([12345], device=DEVICE)
    torch.library.opcheck(function._forward_op, (x, w, b, A, B, u, v, 0.5, True, 0.3, seed, True, True, *forced))
    detached = [t.detach() for t in (x, w, A, B, u, v)]
    x, w, A, B, u, v = detached
    T = x @ A.t()
    dy = torch.randn(20, 24).to(DEVICE)
    needs = [True] * 7
    torch.library.opcheck(function._backward_op, (dy, x, T, w, A, B, u, v, None, needs, 0.5, True, 0.0, *forced))
    needs = [True, False, False, False, True, False, True]  # dx, dB, dv: no x needed
    torch.library.opcheck(function._backward_op, (dy, None, T, w, A, B, u, v, None, needs, 0.5, True, 0.0, *forced))
    bits = torch.randint(0, 256, (20, 5), device=DEVICE, dtype=torch.uint8)  # a dropout mask of x [20, 40]
    needs = [True] * 7
    torch.library.opcheck(function._backward_op, (dy, x, T, w, A, B, u, v, bits, needs, 0.5, True, 0.3, *forced))


def test_forced_choice_reaches_the_custom_ops(monkeypatch):
    """A forced strategy and pointer loads (read while tracing) reach the kernels of both custom ops."""
    from tied_lora_kernels.kernels import forcing

    seen = []
    real = function.fused_lora_mm

    def spy(*args, **kwargs):
        seen.append((kwargs["strategy"], kwargs["tma"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(function, "fused_lora_mm", spy)
    x, params = make_inputs("tl6", 37, 40, 24, 6, torch.bfloat16)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]

    def f(h):
        return tied_lora_linear(h, *args, 0.5, backend="triton")

    with forcing.forced(strategy="two_pass", tma=False):
        y = compiled(f, GraphRecorder())(x)
    y.backward(torch.ones_like(y))
    assert seen == [("two_pass", False)] * 2  # forward y, backward dx


@pytest.mark.parametrize("M", [5, 37], ids=["decode", "prefill"])
@pytest.mark.parametrize("config", ["vera", "lora", "base_only"])
def test_compiled_with_a_frozen_input(config, M):
    """x frozen: the custom op saves neither W (dx only) nor, for VeRA, A (dx and dA only), nor B, u, v where only
    the base trains, and its backward's fake implementation takes their absence; the compiled gradients equal
    eager's, also with those frozen tensors made under ``inference_mode`` (which could not be saved)."""
    x, params = make_inputs(config, M, 40, 24, 6, torch.float32)
    x.requires_grad_(False)
    names = ("weight", "bias", "A", "B", "u", "v")
    unread = ["weight"] if config != "base_only" else ["A", "B", "u", "v"]
    with torch.inference_mode():
        made = {k: params[k].clone() for k in unread}
    for args in ([params[k] for k in names], [made.get(k, params[k]) for k in names]):

        def f(h, args=args):
            return tied_lora_linear(h, *args, 0.5, backend="triton", deterministic=True)

        y, grads = run(f, x, args)
        recorder = GraphRecorder()
        y_c, grads_c = run(compiled(f, recorder), x, args)
        assert recorder.graphs == 1 and FORWARD_OP in recorder.targets
        assert torch.equal(y_c, y) and len(grads_c) == len(grads) > 0
        for got, want in zip(grads_c, grads, strict=True):
            assert torch.equal(got, want)
