"""Tied gradients through the triton backend keep autograd's answer (docs/design.md §4).

Several layers share one ``A`` and one ``B`` (float32 masters) with per-layer ``W, b, u, v``. Each layer's
backward returns its fp32 partial for ``A`` and ``B``; autograd sums them. Every scenario the issue lists —
micro-batch accumulation, ``torch.autograd.grad``, ``retain_graph``, activation checkpointing (non-reentrant
and reentrant), a layer used twice in one forward — must give the gradients of the float64 reference
(the torch backend on float64 copies) and fire each hook on ``A`` and ``B`` as often as it does there.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from tests.conftest import DEVICE
from tests.helpers import assert_close_to_reference, programs_reversed
from tests.test_kernels_parity import make_inputs
from tied_lora_kernels.functional import tied_lora_linear

L, D, R, M = 3, 24, 4, 13
SCALE = 0.75


def make_model(dtype: torch.dtype, master: torch.dtype, seed: int = 0):
    """Shared A [R, D], B [D, R] in ``master``; per layer W [D, D], b [D] (frozen) and u [R], v [D] (trained)."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, dt, std=1.0, grad=True):
        return (torch.randn(*shape, generator=g) * std).to(dt).to(DEVICE).requires_grad_(grad)

    shared = {"A": leaf(R, D, dt=master, std=D**-0.5), "B": leaf(D, R, dt=master, std=R**-0.5)}
    layers = [
        {
            "weight": leaf(D, D, dt=dtype, std=D**-0.5, grad=False),
            "bias": leaf(D, dt=dtype, grad=False),
            "u": 1.0 + leaf(R, dt=master, std=0.3, grad=False),
            "v": leaf(D, dt=master),
        }
        for _ in range(L)
    ]
    for p in layers:  # u built from an expression: make it a leaf
        p["u"] = p["u"].detach().requires_grad_(True)
    return shared, layers


def cast_model(shared, layers, dtype, master):
    def c(t, dt):
        return t.detach().to(dt).requires_grad_(t.requires_grad)

    return {k: c(t, master) for k, t in shared.items()}, [
        {k: c(t, master if k in ("u", "v") else dtype) for k, t in p.items()} for p in layers
    ]


def layer_fn(backend, shared, p):
    def f(h):
        return tied_lora_linear(
            h, p["weight"], p["bias"], shared["A"], shared["B"], p["u"], p["v"], SCALE, backend=backend
        )

    return f


def forward(backend, shared, layers, x, *, checkpointing=None, twice=False):
    h = x
    for i, p in enumerate(layers):
        f = layer_fn(backend, shared, p)
        h = f(h) if checkpointing is None else checkpoint(f, h, use_reentrant=checkpointing)
        if twice and i == 1:
            h = f(h)
    return h


SCENARIOS = ["backward", "accumulate", "autograd_grad", "retain_graph", "ckpt_nonreentrant", "ckpt_reentrant", "twice"]


def run_scenario(name, backend, shared, layers, xs, g):
    """Gradients of every trained parameter, and how often each hook on A and B fired."""
    params = {**shared, **{f"{k}{i}": p[k] for i, p in enumerate(layers) for k in ("u", "v")}}
    fired = {"A": 0, "B": 0, "A_post": 0, "B_post": 0}
    for k in ("A", "B"):
        shared[k].register_hook(lambda grad, k=k: fired.__setitem__(k, fired[k] + 1))
        shared[k].register_post_accumulate_grad_hook(
            lambda t, k=k: fired.__setitem__(f"{k}_post", fired[f"{k}_post"] + 1)
        )

    def loss_of(x, **kw):
        return (forward(backend, shared, layers, x, **kw) * g).sum()

    if name == "backward":
        loss_of(xs[0]).backward()
    elif name == "accumulate":
        for x in xs:
            loss_of(x).backward()
    elif name == "autograd_grad":
        grads = torch.autograd.grad(loss_of(xs[0]), list(params.values()))
        assert all(p.grad is None for p in params.values())
        return dict(zip(params, grads, strict=True)), fired
    elif name == "retain_graph":
        loss = loss_of(xs[0])
        loss.backward(retain_graph=True)
        loss.backward()
    elif name == "ckpt_nonreentrant":
        loss_of(xs[0], checkpointing=False).backward()
    elif name == "ckpt_reentrant":
        loss_of(xs[0].requires_grad_(True), checkpointing=True).backward()
    elif name == "twice":
        loss_of(xs[0], twice=True).backward()
    return {k: p.grad for k, p in params.items()}, fired


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tied_gradients(scenario, dtype):
    master = torch.float32
    shared, layers = make_model(dtype, master)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(M, D, generator=gen).to(dtype).to(DEVICE) for _ in range(2)]
    g = torch.randn(M, D, generator=gen).to(dtype).to(DEVICE)

    got, fired = run_scenario(scenario, "triton", shared, layers, [x.clone() for x in xs], g)
    s64, l64 = cast_model(shared, layers, torch.float64, torch.float64)
    ref, fired_ref = run_scenario(scenario, "torch", s64, l64, [x.double() for x in xs], g.double())
    sb, lb = cast_model(shared, layers, dtype, master)
    base, _ = run_scenario(scenario, "torch", sb, lb, [x.clone() for x in xs], g)

    assert fired == fired_ref, f"hooks fired {fired}, autograd fires {fired_ref}"
    for name in ref:
        # fp32 masters receive fp32 gradients, summed over layers in fp32
        assert got[name].dtype == master, f"d{name} is {got[name].dtype}"
        assert_close_to_reference(got[name], ref[name], base[name], f"d{name}", dtype)


@pytest.mark.parametrize("deterministic", [False, True])
def test_tied_partials_of_bf16_layers_are_summed_in_fp32(deterministic):
    """Each bf16 layer's contribution to the tied fp32 ``A.grad`` and ``B.grad`` is an fp32 partial, summed in fp32:
    with small-integer inputs every partial is an integer of up to ~10⁴, exact in fp32 but not in bf16 (8 bits of
    mantissa), so the gradients equal the float64 reference bit for bit only if no partial (nor the sum) was rounded
    to bf16 on the way. (test_tied_gradients' bf16 tolerance would let such a rounding through.)"""
    Lr, Mr, K, N, Rr = 4, 64, 32, 24, 4
    g = torch.Generator().manual_seed(0)

    def ints(*shape, lo=-2, hi=3, dt=torch.bfloat16):
        return torch.randint(lo, hi, shape, generator=g).to(dt).to(DEVICE)

    def sign(n):
        return 2 * ints(n, lo=0, hi=2, dt=torch.float32) - 1

    A, B = ints(Rr, K, dt=torch.float32).requires_grad_(True), ints(N, Rr, dt=torch.float32).requires_grad_(True)
    layers = [
        dict(x=ints(Mr, K), w=ints(N, K), u=sign(Rr), v=sign(N) * ints(N, lo=1, dt=torch.float32), dy=ints(Mr, N))
        for _ in range(Lr)
    ]  # fmt: skip

    def grads(backend, dtype, master):  # layers in dtype, the tied pair and u, v in master
        a, b = (t.detach().to(master).requires_grad_(True) for t in (A, B))
        partials = []
        for p in layers:
            x, w, u, v, dy = p["x"].to(dtype), p["w"].to(dtype), p["u"].to(master), p["v"].to(master), p["dy"]
            y = tied_lora_linear(x, w, None, a, b, u, v, 1.0, backend=backend, deterministic=deterministic)
            partials.append(torch.autograd.grad(y, (a, b), dy.to(dtype), retain_graph=True))
            y.backward(dy.to(dtype))
        return a.grad, b.grad, partials

    dA, dB, _ = grads("triton", torch.bfloat16, torch.float32)
    ref_A, ref_B, ref_partials = grads("torch", torch.float64, torch.float64)
    assert dA.dtype == dB.dtype == torch.float32
    # (the case can fail: partials that bf16 cannot hold, whose sum it cannot hold either)
    for t in (*ref_partials[0], ref_A, ref_B):
        assert t.abs().max() > 256 and not torch.equal(t.to(torch.bfloat16).double(), t)
    assert torch.equal(dA.double(), ref_A) and torch.equal(dB.double(), ref_B)


def test_hooks_fire_once_per_backward():
    shared, layers = make_model(torch.float32, torch.float32)
    x = torch.randn(M, D).to(DEVICE)
    _, fired = run_scenario("backward", "triton", shared, layers, [x], torch.ones(M, D).to(DEVICE))
    assert fired == {"A": 1, "B": 1, "A_post": 1, "B_post": 1}


def _grads(deterministic: bool, M: int, K: int, N: int, R: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE).requires_grad_(True)
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(dtype).to(DEVICE)
    A = (torch.randn(R, K, generator=g) * K**-0.5).to(DEVICE).requires_grad_(True)
    B = torch.randn(N, R, generator=g).to(DEVICE).requires_grad_(True)
    u, v = torch.randn(R, generator=g).to(DEVICE).requires_grad_(True), torch.randn(N, generator=g).to(DEVICE)
    v.requires_grad_(True)
    y = tied_lora_linear(x, w, None, A, B, u, v, backend="triton", deterministic=deterministic)
    return torch.autograd.grad(y, (x, A, B, u, v), torch.randn(y.shape, generator=g).to(dtype).to(DEVICE))


def test_deterministic_gradients_do_not_depend_on_the_order_programs_run(monkeypatch):
    """deterministic=True sums per-program partials in a fixed order, so no gradient depends on the order in which
    the token reduction's programs finish (on a GPU, any); the interpreter runs them in order, then reversed. The
    atomics of the default do depend on it here (fp32 sums of 11 token blocks in another order): what shows the
    reversal reaches the reduction. The GPU's own test: test_deterministic_runs_are_bitwise_identical_on_gpu."""
    if DEVICE.type == "cuda":
        pytest.skip("the programs' order is the GPU's own there (the GPU test below)")
    in_order = {d: _grads(d, 700, 40, 36, 8, torch.float32) for d in (True, False)}
    programs_reversed(monkeypatch)
    backwards = {d: _grads(d, 700, 40, 36, 8, torch.float32) for d in (True, False)}
    assert all(torch.equal(a, b) for a, b in zip(in_order[True], backwards[True], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(in_order[False], backwards[False], strict=True))


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_backward_launches_no_atomics(monkeypatch, deterministic):
    # what makes the GPU's gradients reproducible: every token reduction (G, du and dv's row sums, dA) writes
    # per-program partials instead of adding atomically; the default adds atomically
    from tied_lora_kernels.kernels import backward

    real, atomic = backward._rank_grad_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                atomic.append(kwargs["USE_ATOMIC"])
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(backward, "_rank_grad_kernel", Spy())
    _grads(deterministic, 70, 40, 36, 8, torch.float32)
    assert len(atomic) == 2 and all(a is not deterministic for a in atomic)  # (G and dS's sums, then dA)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="atomics only race on a GPU")
def test_deterministic_runs_are_bitwise_identical_on_gpu():
    first = _grads(True, 8192, 1024, 1024, 16, torch.bfloat16)
    for _ in range(3):
        again = _grads(True, 8192, 1024, 1024, 16, torch.bfloat16)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


def test_double_backward_is_refused_not_silently_wrong():
    """An input-gradient penalty differentiates dx = dy W + ((dy (s·v ⊙ B)) ⊙ u) A with respect to A, B, u and v
    (create_graph=True). The kernels' backward is first-order only: it raises, naming backend='torch', instead
    of returning a dx whose dependence on the adapter is silently dropped (once_differentiable let that through
    when dy itself needs no grad). The torch path computes it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g).to(DEVICE).requires_grad_(True)
    W, A, B = torch.randn(12, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(12, 4, generator=g)
    W, A, B = W.to(DEVICE), A.to(DEVICE).requires_grad_(True), B.to(DEVICE)
    y = tied_lora_linear(x, W, None, A, B, None, None, 0.5, backend="torch")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (gA,) = torch.autograd.grad(gx.square().sum(), A)
    assert gA.abs().sum() > 0  # the penalty does depend on A
    y = tied_lora_linear(x, W, None, A, B, None, None, 0.5, backend="triton")
    with pytest.raises(RuntimeError, match="first-order gradients only.*backend='torch'"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    (gx,) = torch.autograd.grad(y.sum(), x)  # without create_graph: as before
    assert not gx.requires_grad


@pytest.mark.parametrize("M", [5, 40], ids=["decode", "prefill"])
@pytest.mark.parametrize("name", ["x", "weight", "A", "B", "u", "v"])
def test_an_input_modified_in_place_before_backward_is_refused(name, M):
    """The backward reads what the forward saved through autograd's version checks: an input changed in place
    between forward and backward is refused, as on the torch path, never differentiated with its new values."""
    for backend in ("torch", "triton"):
        x, params = make_inputs("full", M=M, K=48, N=40, R=8, dtype=torch.float32)
        args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
        y = tied_lora_linear(x, *args, 0.5, backend=backend)
        with torch.no_grad():
            (x if name == "x" else params[name]).add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.parametrize("K, N", [(0, 8), (8, 0)], ids=["no_inputs", "no_outputs"])
def test_a_layer_of_zero_width_has_the_torch_paths_gradients(K, N):
    """No input or no output features (the functional form takes them; ``TiedLoRALinear`` refuses them): the
    backward's reductions run over nothing and give zeros (or empty tensors), as the torch path does."""
    results = {}
    for backend in ("torch", "triton"):
        g = torch.Generator().manual_seed(0)
        shapes = {"x": (1, 5, K), "weight": (N, K), "bias": (N,), "A": (3, K), "B": (N, 3), "u": (3,), "v": (N,)}
        x, *args = (torch.randn(s, generator=g).to(DEVICE).requires_grad_(True) for s in shapes.values())
        params = dict(zip(list(shapes)[1:], args, strict=True))
        y = tied_lora_linear(x, *args, 0.5, backend=backend)
        assert y.shape == (1, 5, N)  # (3-D: reshaped to [5, K] also for K = 0)
        y.sum().backward()
        results[backend] = {"x": x.grad, **{k: params[k].grad for k in ("weight", "bias", "A", "B", "u", "v")}}
    for name, want in results["torch"].items():
        got = results["triton"][name]
        assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want), name


@pytest.mark.parametrize("M", [5, 40], ids=["decode", "prefill"])
@pytest.mark.parametrize("config", ["vera", "v_only", "lora", "base_only"])
def test_frozen_tensors_the_backward_does_not_read_are_not_saved(config, M):
    """``W`` is saved only for dx, ``A`` only for dx and dA, and ``B``, ``u``, ``v`` only for dx and the adapter's
    gradients, as the torch path's ops save what their backward reads: with a frozen input, frozen tensors made
    under ``inference_mode`` (a base weight; the whole adapter where only the base trains) take part, and those
    changed in place between forward and backward are no error — the gradients are those of the values the
    forward saw."""
    for backend in ("torch", "triton"):
        x, params = make_inputs(config, M=M, K=48, N=40, R=8, dtype=torch.float32)
        x.requires_grad_(False)
        names = ("weight", "bias", "A", "B", "u", "v")
        trained = [params[k] for k in names if params[k] is not None and params[k].requires_grad]
        # the frozen tensors the backward does not read: W and a frozen A without dx; everything frozen when
        # no adapter factor trains (dW = dyᵀx, db = colsum(dy))
        unread = ["weight", "A"] if config != "base_only" else ["A", "B", "u", "v"]
        unread = [k for k in unread if not params[k].requires_grad]
        with torch.inference_mode():
            made = {k: params[k].clone() for k in unread}
        args = [params[k] for k in names]
        y = tied_lora_linear(x, *args, 0.5, backend=backend, deterministic=True)
        want = torch.autograd.grad(y.sum(), trained)
        in_inference = [made.get(k, params[k]) for k in names]
        ys = [tied_lora_linear(x, *a, 0.5, backend=backend, deterministic=True) for a in (in_inference, args)]
        with torch.no_grad():  # after the forwards, before their backward
            for k in unread:
                params[k].add_(1.0)
        for y in ys:
            for g, w in zip(torch.autograd.grad(y.sum(), trained), want, strict=True):
                assert torch.equal(g, w), backend


@pytest.mark.parametrize("unpack", ["column_major", "negative_view"])
def test_saved_tensors_unpacked_in_another_form_give_the_same_gradients(unpack):
    """A saved-tensor hook may give a saved tensor back in another layout (a column-major copy) or as a lazily
    negated view of the negated values (``torch._neg_view``, as ``-z.conj().imag`` makes): the same values, which
    the backward must read as such, the dropout mask and ``T`` too (the kernels read raw storage: a column-major
    mask was read as row-major, and ``T``'s negative bit was ignored, negating dB, du and dv)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 40, generator=g).to(DEVICE).requires_grad_()
    W = (torch.randn(24, 40, generator=g) * 40**-0.5).to(DEVICE)
    A, B = torch.randn(8, 40, generator=g) * 40**-0.5, torch.randn(24, 8, generator=g) * 8**-0.5
    u, v = 1.0 + 0.3 * torch.randn(8, generator=g), torch.randn(24, generator=g)
    adapter = [t.to(DEVICE).requires_grad_() for t in (A, B, u, v)]
    dy = torch.randn(5, 24, generator=g).to(DEVICE)

    def unpacked(t):
        if unpack == "column_major":
            return t.t().contiguous().t() if t.dim() == 2 else t
        return torch._neg_view(-t) if t.is_floating_point() else t

    def grads(hooked):
        torch.manual_seed(1)  # the same dropout draw
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpacked if hooked else lambda t: t):
            y = tied_lora_linear(x, W, None, *adapter, 0.5, backend="triton", dropout=0.5)
        return torch.autograd.grad(y, (x, *adapter), dy)

    for name, got, want in zip("x A B u v".split(), grads(True), grads(False), strict=True):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("name", ["x", "weight", "A", "v"])
def test_a_dispatching_tensor_subclass_is_refused_by_name_and_auto_runs_torch(name, monkeypatch):
    """A tensor subclass that dispatches its own ops (DTensor, float8 and quantized wrappers; TwoTensor here) has no
    memory holding its values, which the kernels read (they crashed with "invalid python storage"): the triton
    backend names it and the backend that runs it, and "auto" (triton on a GPU) falls back to the torch path, whose
    ops dispatch to the subclass."""
    from torch.testing._internal.two_tensor import TwoTensor

    from tied_lora_kernels import functional

    x, params = make_inputs("tl6", M=5, K=16, N=12, R=4, dtype=torch.float32)
    inputs = {"x": x.detach(), **{k: t.detach() for k, t in params.items()}}
    plain = tied_lora_linear(*inputs.values(), 0.5, backend="torch")
    inputs[name] = TwoTensor(inputs[name], inputs[name].clone())
    with pytest.raises(TypeError, match=f"{name} is a torch.testing._internal.two_tensor.TwoTensor .*backend='torch'"):
        tied_lora_linear(*inputs.values(), 0.5, backend="triton")
    monkeypatch.setattr(functional, "resolve_backend", lambda backend, x, rank=1: "triton")  # (what a GPU gives)
    y = tied_lora_linear(*inputs.values(), 0.5, backend="auto")
    for values in (y.a, y.b) if type(y) is TwoTensor else (y,):  # (an in-place op on a plain y keeps it plain)
        torch.testing.assert_close(values, plain, rtol=1e-6, atol=1e-6)


def test_a_batched_backward_is_refused_by_name():
    """``torch.autograd.grad(..., is_grads_batched=True)`` and ``jacobian(..., vectorize=True)`` vmap the backward
    over a batch of output gradients, whose storage the kernels cannot read: refused, naming backend='torch'
    (which computes them), never a crash inside triton."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g).to(DEVICE).requires_grad_(True)
    W, B = torch.randn(12, 16, generator=g).to(DEVICE), torch.randn(12, 4, generator=g).to(DEVICE)
    A = torch.randn(4, 16, generator=g).to(DEVICE).requires_grad_(True)
    dys = torch.randn(3, 5, 12, generator=g).to(DEVICE)

    def f(backend):
        return lambda h: tied_lora_linear(h, W, None, A, B, None, None, 0.5, backend=backend)

    (want,) = torch.autograd.grad(f("torch")(x), x, dys, is_grads_batched=True)
    for i in range(3):  # (the torch path's answer, one gradient at a time on the triton path)
        (one,) = torch.autograd.grad(f("triton")(x), x, dys[i])
        torch.testing.assert_close(want[i], one, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="no batched backward.*backend='torch'"):
        torch.autograd.grad(f("triton")(x), x, dys, is_grads_batched=True)
    with pytest.raises(RuntimeError, match="no batched backward.*backend='torch'"):
        torch.autograd.functional.jacobian(f("triton"), x.detach(), vectorize=True)
