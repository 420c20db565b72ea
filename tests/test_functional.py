"""``tied_lora_linear`` on the torch backend: parity with the float64 reference for every configuration,
its memory promises (no [M, N] temporary, no copy of the shared weights), and every input error."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import assert_close_to_reference
from tied_lora_kernels import TiedLoRAConfig, TiedLoRALinear, TiedLoRAShared, reference, tied_lora_linear
from tied_lora_kernels.functional import add_adapter
from tied_lora_kernels.kernels import forcing

# (u, v, A trains, B trains): the paper's configurations as they reach the functional form (u, v: False for None,
# True for a trained vector, "frozen" for one that does not train; TL5's u and v, frozen at one, are None as LoRA's)
CONFIGS = {
    "lora": (False, False, True, True),
    "frozen_u_v": ("frozen", "frozen", True, True),  # (e.g. an adapter loaded with trainable=False, then A and B)
    "tl6": (True, True, True, True),
    "vera": (True, True, False, False),
    "u_only": (True, False, False, False),
    "v_only_frozen_AB": (False, True, False, False),
}


def make_inputs(
    M,
    K,
    N,
    R,
    *,
    dtype=torch.float32,
    adapter_dtype=torch.float32,
    bias=True,
    u=True,
    v=True,
    train_A=True,
    train_B=True,
    lead=(),
    seed=0,
):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    t = {
        "x": rnd(*lead, M, K).to(dtype),
        "weight": rnd(N, K, scale=max(K, 1) ** -0.5).to(dtype),
        "bias": rnd(N).to(dtype) if bias else None,
        "A": rnd(R, K, scale=max(K, 1) ** -0.5).to(adapter_dtype),
        "B": rnd(N, R).to(adapter_dtype),
        "u": rnd(R).to(adapter_dtype) if u else None,
        "v": rnd(N).to(adapter_dtype) if v else None,
    }
    train = {"x": True, "weight": False, "bias": bias, "A": train_A, "B": train_B, "u": u is True, "v": v is True}
    for name, tensor in t.items():
        if tensor is not None and train[name]:
            tensor.requires_grad_()
    return t


def run(fn, t, scale, dy, **kw):
    """Output and the gradient of every input that requires one."""
    y = fn(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], scale, **kw)
    leaves = {k: v for k, v in t.items() if v is not None and v.requires_grad}
    grads = torch.autograd.grad(y, list(leaves.values()), dy.to(y.dtype))
    return y, dict(zip(leaves, grads, strict=True))


def check_parity(t, scale=0.5, dtype=None, **kw):
    """torch backend vs float64 reference, with plain reference in the same dtype as the baseline."""
    dy = torch.randn(*t["x"].shape[:-1], t["weight"].shape[0], generator=torch.Generator().manual_seed(1))
    y, grads = run(tied_lora_linear, t, scale, dy, backend="torch", **kw)
    y64, grads64 = run(reference.tied_lora_forward, t, scale, dy, upcast=True)
    yb, gradsb = run(reference.tied_lora_forward, t, scale, dy)
    assert y.dtype == t["x"].dtype
    assert_close_to_reference(y, y64, yb, "y", dtype)
    assert grads.keys() == grads64.keys()
    for name in grads:
        assert grads[name].dtype == t[name].dtype, name
        assert_close_to_reference(grads[name], grads64[name], gradsb[name], f"d{name}", dtype)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("bias", [True, False])
def test_parity_every_configuration(config, bias):
    u, v, train_A, train_B = CONFIGS[config]
    check_parity(make_inputs(33, 24, 20, 5, bias=bias, u=u, v=v, train_A=train_A, train_B=train_B))


@pytest.mark.parametrize(
    "M,K,N,R,lead",
    [(0, 8, 6, 2, ()), (1, 8, 6, 1, ()), (5, 17, 19, 17, ()), (4, 9, 7, 3, (2, 3)), (37, 64, 48, 16, ())]
    + [(6, 4, 9, 8, ()), (6, 9, 3, 8, ())]  # a rank above in_features, above out_features (accepted, as by PEFT)
    + [(3, 0, 6, 2, (2,)), (3, 5, 0, 2, (2,))],  # no input or no output features, with a leading dim (as F.linear)
)
def test_parity_shapes(M, K, N, R, lead):
    check_parity(make_inputs(M, K, N, R, lead=lead))


def test_float64_matches_reference_to_its_rounding():
    # (not bit for bit: the torch path folds v into B and accumulates with addmm_, another order of operations than
    # the reference's; the tolerance rule then allows ~1e-12 of the magnitude)
    t = make_inputs(9, 12, 10, 4, dtype=torch.float64, adapter_dtype=torch.float64)
    check_parity(t, dtype=torch.float64)


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_parity_bfloat16(adapter_dtype):
    check_parity(make_inputs(16, 32, 24, 4, dtype=torch.bfloat16, adapter_dtype=adapter_dtype), dtype=torch.bfloat16)


def test_autocast_bfloat16_keeps_float32_masters():
    t = make_inputs(16, 32, 24, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = tied_lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], backend="torch")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert t["A"].grad.dtype == torch.float32 and t["x"].grad.dtype == torch.float32
    bf = {k: (v.detach().bfloat16() if k in ("x", "weight", "bias") else v.detach()) for k, v in t.items()}
    expected = reference.tied_lora_forward(**{k: bf[k] for k in ("x", "weight", "bias", "A", "B", "u", "v")})
    assert_close_to_reference(y, reference.tied_lora_forward(**bf, upcast=True), expected, "y", torch.bfloat16)


def test_noncontiguous_input():
    t = make_inputs(12, 16, 10, 3)
    x = torch.randn(16, 12, dtype=torch.float32).t().requires_grad_()  # [12, 16], column-major
    t["x"] = x
    check_parity(t)


class _Allocations(TorchDispatchMode):
    """Records each non-view, out-of-place op with its output shape."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and not name.endswith("_") and isinstance(out, torch.Tensor):
            self.ops.append((name, tuple(out.shape)))
        return out


@pytest.mark.parametrize("layer", [False, True], ids=["tensors", "parameters"])
def test_torch_path_makes_one_MN_tensor_and_no_weight_copy(layer):
    """Also for a layer's nn.Parameters with v None (LoRA), whose B reaches the addmm as the Parameter itself."""
    M, K, N, R = 64, 32, 48, 4
    t = make_inputs(M, K, N, R)
    if layer:
        t = {k: torch.nn.Parameter(v.detach()) if k in ("weight", "bias", "A", "B", "u") else v for k, v in t.items()}
        t["v"] = None
    with _Allocations() as mode:
        tied_lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], 0.5, backend="torch")
    mn = [op for op in mode.ops if op[1] == (M, N)]
    assert len(mn) == 1, f"expected only the output to be [M, N], got {mn}"
    copies = [op for op in mode.ops if op[0] in ("_to_copy", "clone", "contiguous") and op[1] in ((R, K), (N, K))]
    assert not copies, f"shared or base weights copied: {copies}"


# ---------------------------------------------------------------------------------------------------------
# bad input: each a clear error naming the problem


def _call(**overrides):
    t = make_inputs(4, 8, 6, 2)
    t.update(overrides)
    scale = t.pop("scale", 1.0)
    backend = t.pop("backend", "torch")
    return tied_lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], scale, backend=backend)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        ({"x": torch.randn(4, 9)}, ValueError, "in_features=8"),
        ({"weight": torch.randn(6, 8, 1)}, ValueError, "weight must be 2-D"),
        ({"A": torch.randn(2, 9)}, ValueError, "A must be"),
        ({"B": torch.randn(6, 3)}, ValueError, "B must be"),
        ({"B": torch.randn(5, 2)}, ValueError, "B must be"),
        ({"bias": torch.randn(5)}, ValueError, "bias must be 1-D of length 6"),
        ({"u": torch.randn(3)}, ValueError, "u must be 1-D of length 2"),
        ({"v": torch.randn(6, 1)}, ValueError, "v must be 1-D of length 6"),
        ({"A": torch.randn(0, 8), "B": torch.randn(6, 0), "u": None}, ValueError, "rank must be positive"),
        ({"x": torch.ones(4, 8, dtype=torch.int64)}, TypeError, "floating-point"),
        ({"weight": torch.randn(6, 8, dtype=torch.float64)}, TypeError, "weight is torch.float64 but x"),
        ({"bias": torch.randn(6, dtype=torch.float16)}, TypeError, "bias is torch.float16"),
        ({"A": torch.randn(2, 8, dtype=torch.float16)}, TypeError, "adapters must be float32 or x's dtype"),
        ({"A": torch.randn(2, 8, device="meta")}, ValueError, "A is on meta but x is on cpu"),
        ({"x": None}, TypeError, "x is required"),
        ({"u": [1.0, 2.0]}, TypeError, "u must be a torch.Tensor"),
        ({"scale": float("nan")}, ValueError, "scale must be a finite"),  # (the right type, a wrong value)
        ({"scale": torch.tensor(1.0)}, TypeError, "scale must be a finite"),
        ({"scale": 1e39}, ValueError, "within float32's range"),
        ({"scale": True}, TypeError, "scale must be a finite"),
        ({"weight": torch.randn(6, 8).to_sparse()}, TypeError, "weight is a sparse_coo tensor"),
        ({"A": torch.randn(2, 8).to_sparse()}, TypeError, "A is a sparse_coo tensor"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
    ],
    ids=lambda p: p if isinstance(p, str) else None,
)
def test_bad_input_raises_clear_error(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_more_bad_input():
    t = make_inputs(4, 8, 6, 2)
    args = [t[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    nested = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)], layout=torch.jagged)
    with pytest.raises(TypeError, match="x is a nested tensor"):
        tied_lora_linear(nested, *args)
    with pytest.raises(TypeError, match="deterministic must be True, False or None"):
        tied_lora_linear(t["x"], *args, deterministic="no")
    with pytest.raises(TypeError, match="y must be a floating-point tensor"):
        add_adapter(torch.zeros(4, 6, dtype=torch.int64), t["x"], t["A"], t["B"])
    # fp16 adapters beside an x that autocast made bf16: the message says autocast did it
    fp16 = {k: t[k].detach().half() for k in ("x", "weight", "A", "B")}
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="autocast's torch.bfloat16"):
        tied_lora_linear(fp16["x"], fp16["weight"], None, fp16["A"], fp16["B"])


_HUGE = 10**5000  # more digits than Python prints (4,300): an error that printed it would fail in its own message


def _enter_forced(**kwargs):
    with forcing.forced(**kwargs):
        pass


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: TiedLoRAConfig(alpha=_HUGE), "alpha must be a positive finite number"),
        (lambda: TiedLoRAConfig(alpha=-_HUGE), "alpha must be a positive finite number"),
        (lambda: TiedLoRAConfig(u_init=_HUGE), "u_init must be a finite number"),
        (lambda: TiedLoRAConfig(rank=_HUGE), "rank must be below 2"),
        (lambda: TiedLoRAConfig(rank=-_HUGE), "rank must be positive"),
        (lambda: TiedLoRAConfig(seed=-_HUGE), "seed must be within"),
        (lambda: TiedLoRAConfig(dropout=_HUGE), "dropout must be a number"),
        (lambda: TiedLoRAShared(8, 8, rank=_HUGE), "rank must be below 2"),
        (lambda: TiedLoRAShared(_HUGE, 8, rank=2), "in_features must be below 2"),
        (lambda: TiedLoRALinear(8, -_HUGE, rank=2), "out_features must be a positive int"),
        (lambda: TiedLoRALinear(8, 8, rank=2, alpha=_HUGE), "alpha must be a positive finite number"),
        (lambda: TiedLoRALinear(8, 8, rank=2, u_init=-_HUGE), "u_init must be a finite number"),
        (lambda: TiedLoRALinear(8, 8, rank=2, v_init=_HUGE), "v_init must be a finite number"),
        (lambda: TiedLoRALinear(8, 8, rank=2, dropout=_HUGE), "dropout must be a number"),
        (lambda: _call(scale=_HUGE), "scale must be a finite Python number"),
        (lambda: _enter_forced(split_k=-_HUGE), "split_k must be >= 1"),
    ],
)
def test_huge_ints_are_refused_by_name(build, match):
    """An int of 5,000 digits is refused by the check it fails, the number given by its size. Before, the
    message's own formatting raised Python's "Exceeds the limit (4300 digits)" ValueError, and a huge rank or
    width went on to torch's allocator (a TypeError about unpacking a long long) or was accepted by the config."""
    with pytest.raises((ValueError, TypeError), match=match) as info:
        build()
    assert "an int of 16610 bits" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_triton_backend_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here"):
        _call(backend="triton")


def test_rocm_is_refused_by_name(monkeypatch):
    # ROCm reports its gfx version as a CUDA capability (9.4 on MI300): it must not pass for a Hopper
    from tied_lora_kernels import kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    assert "ROCm is not supported" in kernels.unavailable_reason(torch.device("cuda", 0))
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(kernels, "hopper_ptxas", lambda: None)  # (the installed triton's Hopper ptxas: not this test's)
    assert kernels.unavailable_reason(torch.device("cuda", 0)) is None


def test_a_triton_too_old_for_the_kernels_is_refused_by_name(monkeypatch):
    # triton 3.3 fails to compile the kernels (UnsupportedLanguageConstruct deep in the first launch): refused up
    # front, naming the version needed; "auto" then runs the torch path
    import triton

    from tied_lora_kernels import kernels
    from tied_lora_kernels.functional import _cached_reason

    monkeypatch.setattr(triton, "__version__", "3.3.1")
    monkeypatch.setattr(kernels, "hopper_ptxas", lambda: None)  # (the installed triton's Hopper ptxas: not this test's)
    _cached_reason.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"triton 3.3.1 is installed and the kernels need triton >= 3.4"):
            _call(backend="triton")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        assert "triton >= 3.4" in kernels.unavailable_reason(torch.device("cuda", 0))
        monkeypatch.setattr(triton, "__version__", "3.4.0+git1234")
        assert kernels.unavailable_reason(torch.device("cuda", 0)) is None
    finally:
        _cached_reason.cache_clear()


@pytest.fixture
def fake_ptxas(monkeypatch):
    """``kernels.hopper_ptxas`` over a fake triton: ``fake_ptxas(versions, bundled, driver)``. ``versions`` is the
    version of the one ptxas triton assembles every architecture with (a string: triton 3.8 and older), or a version
    per ptxas path (a dict: triton >= 3.9, which takes sm_90 and newer's from ``TRITON_PTXAS_BLACKWELL_PATH`` or its
    ``ptxas-blackwell`` and older ones' from ``TRITON_PTXAS_PATH`` or its ``ptxas``); ``bundled`` is the version of
    triton's newer bundled one (None: none), ``driver`` the CUDA version the driver supports. Each call resets the
    process-wide decision and returns the list that records clears of triton's ptxas-version cache."""
    import os

    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.nvidia import compiler
    from triton.knobs import NvidiaTool

    from tied_lora_kernels import kernels
    from tied_lora_kernels.kernels import configs

    knobs = ("TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH")
    saved = {k: os.environ.pop(k, None) for k in knobs}  # (put back after the test: hopper_ptxas sets the first)
    cleared = []

    class Version:  # triton's cached get_ptxas_version, part of its cache key
        def __call__(self, arch=80):
            return "ptxas"

        def cache_clear(self):
            cleared.append(True)

    def set_versions(versions: str | dict[str, str], bundled: str | None, driver=(13, 0)):
        def get_ptxas(arch=80):
            if isinstance(versions, str):  # (the one TRITON_PTXAS_PATH names, else triton's)
                return NvidiaTool(os.environ.get("TRITON_PTXAS_PATH", "/triton/bin/ptxas"), versions)
            if arch >= 90:
                path = os.environ.get("TRITON_PTXAS_BLACKWELL_PATH", "/triton/bin/ptxas-blackwell")
            else:
                path = os.environ.get("TRITON_PTXAS_PATH", "/triton/bin/ptxas")
            return NvidiaTool(path, versions[path])

        monkeypatch.setattr(compiler, "get_ptxas", get_ptxas)
        monkeypatch.setattr(compiler, "get_ptxas_version", Version())
        fixed = None if bundled is None else NvidiaTool("/triton/bin/ptxas-blackwell", bundled)
        monkeypatch.setattr(kernels.ptxas, "_bundled_ptxas", lambda: fixed)
        monkeypatch.setattr(kernels.ptxas, "_driver_cuda", lambda: driver)
        kernels.ptxas._hopper_ptxas.cache_clear()
        configs._cuda_capability.cache_clear()
        return cleared

    yield set_versions
    kernels.ptxas._hopper_ptxas.cache_clear()
    configs._cuda_capability.cache_clear()
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


def test_hopper_kernels_are_assembled_by_a_ptxas_that_does_not_corrupt_them(fake_ptxas, monkeypatch):
    # ptxas 12.9 (triton 3.8's for Hopper) can corrupt a wgmma reading A from registers, as the fused GEMMs' rank-R
    # dot does: triton's bundled newer ptxas takes over, with a warning naming the user's line, once per process
    import os
    import warnings

    from tied_lora_kernels import kernels
    from tied_lora_kernels.kernels import configs

    for unaffected in ("12.8", "13.3", "13.4"):
        fake_ptxas(unaffected, "13.3")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernels.hopper_ptxas() is None
        assert "TRITON_PTXAS_PATH" not in os.environ

    cleared = fake_ptxas("12.9", "13.3")
    with pytest.warns(UserWarning, match=r"ptxas 12\.9, which can corrupt .* bundled ptxas 13\.3") as caught:
        assert kernels.hopper_ptxas() is None
    assert caught[0].filename == __file__
    assert os.environ["TRITON_PTXAS_PATH"] == "/triton/bin/ptxas-blackwell"
    assert cleared  # triton's cache key names the ptxas that builds from now on
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.hopper_ptxas() is None  # decided once

    # a fixed ptxas cannot be had, or this driver cannot load what it builds: the kernels are refused on Hopper, by
    # name, and said once ("auto" runs the torch path)
    for bundled, driver, why in (
        (None, (13, 0), "set TRITON_PTXAS_PATH to a ptxas outside 12.9-13.2 (CUDA 12.8's, or 13.3 or newer)"),
        ("13.1", (13, 0), "set TRITON_PTXAS_PATH to a ptxas outside 12.9-13.2"),
        ("13.3", (12, 8), "need a driver for CUDA 13 and this NVIDIA driver is for CUDA 12.8: update the driver"),
    ):
        fake_ptxas("12.9", bundled, driver)
        os.environ.pop("TRITON_PTXAS_PATH", None)  # (set by the switch above)
        with pytest.warns(UserWarning, match="the fused kernels do not run on Hopper in this process") as caught:
            assert why in kernels.hopper_ptxas()
        assert len(caught) == 1 and "TRITON_PTXAS_PATH" not in os.environ
    fake_ptxas("12.9", "13.3")
    os.environ["TRITON_PTXAS_PATH"] = "/cuda-12.9/bin/ptxas"  # the user's choice is not overridden
    with pytest.warns(UserWarning, match="TRITON_PTXAS_PATH chose it"):
        reason = kernels.hopper_ptxas()
    assert "TRITON_PTXAS_PATH chose it" in reason and os.environ["TRITON_PTXAS_PATH"] == "/cuda-12.9/bin/ptxas"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert kernels.unavailable_reason(torch.device("cuda", 0)) == reason
    with pytest.raises(RuntimeError, match=r"the triton kernels cannot run on cuda:0: triton .* ptxas 12\.9"):
        configs._capability(torch.device("cuda", 0))  # (launches that skip the dispatcher)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert kernels.unavailable_reason(torch.device("cuda", 0)) is None  # Ampere runs no wgmma


def test_the_fixed_ptxas_is_the_one_triton_ships(monkeypatch):
    # TRITON_PTXAS_BLACKWELL_PATH may point triton's knob elsewhere (an older ptxas): the file triton ships is the fix
    pytest.importorskip("triton.backends.nvidia")
    import os

    import triton

    from tied_lora_kernels.kernels import ptxas

    shipped = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    if not os.path.isfile(shipped):
        pytest.skip(f"triton {triton.__version__} ships no ptxas-blackwell")
    monkeypatch.setenv("TRITON_PTXAS_BLACKWELL_PATH", os.path.join(os.path.dirname(shipped), "ptxas"))
    assert ptxas._bundled_ptxas().path == shipped


def test_auto_backend_on_cpu_is_torch():
    from tied_lora_kernels.functional import resolve_backend

    assert resolve_backend("auto", torch.zeros(1, device="cpu")) == "torch"


def test_autocast_casts_float32_weight_like_linear():
    """Under autocast a float32 layer fed a bf16 activation (o_proj after an autocast matmul) runs as
    F.linear would: x, W and b in the autocast dtype."""
    t = make_inputs(8, 16, 12, 4)
    x = t["x"].detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = tied_lora_linear(x, t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], backend="torch")
        base = torch.nn.functional.linear(x, t["weight"], t["bias"])
    assert y.dtype == base.dtype == torch.bfloat16


def test_autocast_leaves_float64_alone():
    t = make_inputs(8, 16, 12, 4, dtype=torch.float64, adapter_dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = tied_lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], backend="torch")
        # a float32 weight beside a float64 x is cast and x is not, as F.linear's are: the error says why
        with pytest.raises(TypeError, match=r"x is torch.float64 \(autocast to torch.bfloat16 casts float32 and"):
            tied_lora_linear(t["x"], t["weight"].float(), None, t["A"], t["B"], backend="torch")
    assert y.dtype == torch.float64


def test_meta_tensors_give_meta_output():
    t = {k: (v.detach().to("meta") if v is not None else None) for k, v in make_inputs(5, 8, 6, 2).items()}
    y = tied_lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"])
    assert y.is_meta and y.shape == (5, 6)


def test_a_float32_base_beside_a_16_bit_input_is_refused_by_name():
    """Only the adapters may stay float32 beside a 16-bit x (master weights): a float32 weight or bias is refused
    with an error that names it, before any GEMM."""
    t = make_inputs(4, 8, 6, 2, dtype=torch.bfloat16)
    adapters = (t["A"], t["B"], t["u"], t["v"])
    with pytest.raises(TypeError, match="weight is torch.float32 but x is torch.bfloat16"):
        tied_lora_linear(t["x"], t["weight"].float(), t["bias"], *adapters, backend="torch")
    with pytest.raises(TypeError, match="bias is torch.float32 but x is torch.bfloat16"):
        tied_lora_linear(t["x"], t["weight"], t["bias"].float(), *adapters, backend="torch")


def test_add_adapter_with_no_input_or_output_features():
    """K = 0 with leading dims: the adapter term is zero (an empty sum), as F.linear's product is; N = 0: an empty
    output of the right shape."""
    y = torch.randn(2, 3, 8)
    out = add_adapter(y, torch.randn(2, 3, 0), torch.randn(4, 0), torch.randn(8, 4), scale=0.5)
    assert out.shape == y.shape and torch.equal(out, y)
    out = add_adapter(torch.randn(2, 3, 0), torch.randn(2, 3, 5), torch.randn(4, 5), torch.randn(0, 4))
    assert out.shape == (2, 3, 0)


def test_hopper_ptxas_asks_triton_for_the_sm90_assembler(fake_ptxas):
    # triton 3.9 assembles sm_80 with its ptxas 12.9 and sm_90 with ptxas-blackwell 13.4: Hopper is safe, so nothing
    # changes and nothing is said (catches: current = _ptxas(compiler, 80))
    import os
    import warnings

    from tied_lora_kernels import kernels

    fake_ptxas({"/triton/bin/ptxas": "12.9", "/triton/bin/ptxas-blackwell": "13.4"}, "13.4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.hopper_ptxas() is None
    assert "TRITON_PTXAS_PATH" not in os.environ


def test_an_affected_ptxas_chosen_through_the_blackwell_knob_is_refused(fake_ptxas):
    # triton >= 3.9 takes Hopper's ptxas from TRITON_PTXAS_BLACKWELL_PATH: a 12.9 chosen there is the user's choice,
    # refused by name; setting TRITON_PTXAS_PATH would not change what assembles sm_90 (catches: the loop over
    # the two variables reduced to TRITON_PTXAS_PATH)
    import os

    from tied_lora_kernels import kernels

    fake_ptxas(
        {"/triton/bin/ptxas": "12.9", "/triton/bin/ptxas-blackwell": "13.4", "/cuda-12.9/bin/ptxas": "12.9"}, "13.4"
    )
    os.environ["TRITON_PTXAS_BLACKWELL_PATH"] = "/cuda-12.9/bin/ptxas"
    with pytest.warns(UserWarning, match="the fused kernels do not run on Hopper"):
        reason = kernels.hopper_ptxas()
    assert reason is not None and "TRITON_PTXAS_BLACKWELL_PATH chose it" in reason
    assert "TRITON_PTXAS_PATH" not in os.environ


class _FakeLibcuda:
    def __init__(self, version: int, status: int = 0):
        self.version, self.status = version, status

    def cuDriverGetVersion(self, ref):  # noqa: N802 (the driver API's name)
        ref._obj.value = self.version
        return self.status


@pytest.mark.parametrize("raw, expected", [(12080, (12, 8)), (13000, (13, 0)), (12090, (12, 9)), (13020, (13, 2))])
def test_the_driver_cuda_version_is_read_as_major_minor(monkeypatch, raw, expected):
    # cuDriverGetVersion reports 1000·major + 10·minor (catches: // 100, a success read as failure)
    import ctypes

    from tied_lora_kernels.kernels import ptxas

    monkeypatch.setattr(ctypes, "CDLL", lambda name: _FakeLibcuda(raw))
    assert ptxas._driver_cuda() == expected
    monkeypatch.setattr(ctypes, "CDLL", lambda name: _FakeLibcuda(raw, status=100))  # CUDA_ERROR_NO_DEVICE
    assert ptxas._driver_cuda() is None


def test_blackwell_launches_do_not_depend_on_hoppers_ptxas(fake_ptxas, monkeypatch):
    # only sm_90 runs the register-input wgmma: a Blackwell GPU launches whatever Hopper's ptxas is (catches:
    # configs._cuda_capability asking hopper_ptxas for major >= 9)
    import os
    import warnings

    from tied_lora_kernels.kernels import configs

    fake_ptxas({"/triton/bin/ptxas-blackwell": "12.9"}, None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert configs._capability(torch.device("cuda", 0)) == (10, 0)
    assert "TRITON_PTXAS_PATH" not in os.environ
