"""Parity of the triton backend against the float64 reference: forward and every gradient.

Without a GPU the kernels run in triton's interpreter (tests/conftest.py). Shapes are small and chosen to
break kernels: M = 0, 1 and odd sizes, K and N that are multiples of no block size, ranks 1 to 128, 3-D
and strided inputs, bias on and off, every configuration, fp32, fp16, bf16 and autocast.

How bf16 is covered honestly (docs/design.md §6). The interpreter's bf16 arithmetic is wrong, so when
interpreting bf16 the kernels load tiles as fp32 and round every value the GPU rounds to bf16 with
round-to-nearest-even (``kernels/common.py``, switch ``UPCAST``; never set on a GPU). That models the GPU's
arithmetic (bf16 products are exact in fp32, tensor cores accumulate in fp32), so the CPU run checks
indexing, masking and every rounding point of the bf16 path; on a GPU the same tests run the real bf16
kernels. ``test_small_integers_are_exact`` adds an arithmetic-independent check: with small-integer inputs
every intermediate is exactly representable, so forward and every gradient must equal the float64
reference bit for bit, in the interpreter and on the GPU alike (docs/design.md §7's ptxas epilogue-dot trap).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import DEVICE
from tests.helpers import assert_close_to_reference, max_error
from tied_lora_kernels.functional import tied_lora_linear
from tied_lora_kernels.kernels import configs, forcing
from tied_lora_kernels.kernels.backward import rank_grad
from tied_lora_kernels.kernels.forward import fused_lora_mm
from tied_lora_kernels.reference import tied_lora_forward

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# which of (A, B, u, v, weight) train; u/v = "none" means not passed (ones, frozen)
CONFIGS = {
    "lora": dict(train=("A", "B"), uv="none"),
    "tl5": dict(train=("A", "B"), uv="frozen"),
    "tl6": dict(train=("A", "B", "u", "v"), uv="trained"),
    "vera": dict(train=("u", "v"), uv="trained"),
    "full": dict(train=("A", "B", "u", "v", "weight", "bias"), uv="trained"),
    # subsets where one gradient needs a tensor the others do not: dv alone needs T, dW alone needs x
    "v_only": dict(train=("v",), uv="trained"),
    "base_only": dict(train=("weight", "bias"), uv="trained"),
}


def make_inputs(config, M, K, N, R, dtype, *, bias=True, lead=None, strided=False, adapter_dtype=torch.float32):
    """Inputs of one layer on DEVICE; ``lead`` replaces (M,) by leading dims; ``strided`` gives a non-contiguous x."""
    spec = CONFIGS[config]
    g = torch.Generator().manual_seed(1234 + M + 7 * K + 13 * N + R)

    def randn(*shape, dt=dtype, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dt).to(DEVICE)

    lead = lead or (M,)
    if strided:  # every other column of a wider tensor, then a transpose-free row stride
        x = randn(*lead, 2 * K)[..., ::2]
        assert not x.is_contiguous()
    else:
        x = randn(*lead, K)
    params = {
        "weight": randn(N, K, std=K**-0.5),
        "bias": randn(N) if bias else None,
        "A": randn(R, K, dt=adapter_dtype, std=K**-0.5),
        "B": randn(N, R, dt=adapter_dtype, std=R**-0.5),
        "u": None if spec["uv"] == "none" else 1.0 + randn(R, dt=adapter_dtype, std=0.5),
        "v": None if spec["uv"] == "none" else randn(N, dt=adapter_dtype),
    }
    x.requires_grad_(True)
    for name, t in params.items():
        if t is not None and name in spec["train"]:
            t.requires_grad_(True)
    return x, params


def grads_of(y, dy, inputs):
    wanted = {k: t for k, t in inputs.items() if t is not None and t.requires_grad}
    grads = torch.autograd.grad(y, list(wanted.values()), dy, allow_unused=False)
    return dict(zip(wanted, grads, strict=True))


def check_parity(x, params, scale=0.5, *, deterministic=False, autocast_dtype=None, dy_view=None):
    """Triton forward and every gradient vs float64, with plain PyTorch in the compute dtype as baseline
    (``dy_view``: applied to the output's gradient before the backward)."""
    dtype = autocast_dtype or x.dtype
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    inputs = {"x": x, **params}
    if autocast_dtype is None:
        y = tied_lora_linear(x, *args, scale, backend="triton", deterministic=deterministic)
    else:
        with torch.autocast(DEVICE.type, dtype=autocast_dtype):
            y = tied_lora_linear(x, *args, scale, backend="triton", deterministic=deterministic)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], params["weight"].shape[0])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEVICE)
    if dy_view is not None:
        dy = dy_view(dy)

    expected = tied_lora_forward(x, *args, scale, upcast=True)
    # baseline: the same math in plain PyTorch in the compute dtype (x, W, b cast as autocast would)
    cast = {k: (t.to(dtype) if t is not None and k in ("x", "weight", "bias") else t) for k, t in inputs.items()}
    baseline = tied_lora_forward(cast["x"], *[cast[k] for k in ("weight", "bias", "A", "B", "u", "v")], scale)

    assert_close_to_reference(y, expected, baseline, "y", dtype)
    got = grads_of(y, dy, inputs)
    ref = grads_of(expected, dy.double(), inputs)
    base = grads_of(baseline, dy, inputs)
    for name in got:
        assert got[name].dtype == inputs[name].dtype, f"d{name} dtype"
        assert_close_to_reference(got[name], ref[name], base[name], f"d{name}", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_configurations(config, dtype):
    x, params = make_inputs(config, M=37, K=40, N=70, R=8, dtype=dtype, bias=config != "lora")
    check_parity(x, params)


# (trained adapter tensors, whether x asks for its gradient): each of the 16 subsets of A, B, u, v, with and
# without dx, but the one where nothing asks for a gradient
_SUBSETS = [
    (subset, x_grad)
    for n in range(5)
    for subset in itertools.combinations(("A", "B", "u", "v"), n)
    for x_grad in (True, False)
    if subset or x_grad
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [5, 40], ids=["decode", "prefill"])
@pytest.mark.parametrize(
    "train,x_grad", _SUBSETS, ids=["".join(s or ("frozen",)) + ("-dx" if dx else "") for s, dx in _SUBSETS]
)
def test_every_trained_subset_of_the_adapter(train, x_grad, M, dtype, monkeypatch):
    """Each set of trained A, B, u, v (the named configurations are 5 of the 16), with and without dx: what the
    forward keeps and which backward launches run follow each gradient asked for."""
    monkeypatch.setitem(CONFIGS, "subset", dict(train=train, uv="trained"))
    x, params = make_inputs("subset", M=M, K=40, N=70, R=8, dtype=dtype)
    x.requires_grad_(x_grad)
    check_parity(x, params)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [5, 40], ids=["decode", "prefill"])
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_strided_and_expanded_vectors(layout, M, dtype):
    # u and v that are not contiguous reach the kernels as views: their gradients are taken with respect to them
    x, params = make_inputs("tl6", M=M, K=40, N=70, R=8, dtype=dtype)
    for name in ("u", "v"):
        value = params[name].detach()
        if layout == "strided":  # every other element of a longer tensor, garbage in between
            store = torch.stack([value, torch.full_like(value, 1e6)], 1).reshape(-1).requires_grad_(True)
            params[name] = store[::2]
        else:  # one value broadcast (stride 0)
            params[name] = value[:1].clone().requires_grad_(True).expand(value.numel())
        assert not params[name].is_contiguous()
    check_parity(x, params)


# shape cases, each run in fp32 and bf16 for TL6 (every input trains except the base)
SHAPES = {
    "M0": dict(M=0, K=40, N=70, R=8),
    "M1": dict(M=1, K=40, N=70, R=8),
    "width1": dict(M=17, K=1, N=1, R=1),  # (a GPU specialises ints equal to 1)
    "narrow": dict(M=3, K=3, N=5, R=2),
    "rank1": dict(M=19, K=33, N=45, R=1),
    "rank16": dict(M=19, K=33, N=45, R=16),
    "rank64-mid": dict(M=70, K=81, N=67, R=64),
    "rank128": dict(M=20, K=130, N=136, R=128),
    "prefill": dict(M=300, K=72, N=90, R=8),
    "3d": dict(M=21, lead=(3, 7), K=40, N=70, R=8),
    "strided": dict(M=21, K=40, N=70, R=8, strided=True),
    "nobias": dict(M=21, K=40, N=70, R=8, bias=False),
    # a rank above a layer's width (accepted, as PEFT accepts it): rank tiles wider than the K and N tiles' data
    "wide_in": dict(M=19, K=4, N=45, R=16),
    "wide_out": dict(M=19, K=33, N=3, R=16),
    "wide_both": dict(M=300, K=5, N=6, R=64),
    "wide_decode": dict(M=1, K=4, N=36, R=8),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SHAPES))
def test_shapes(case, dtype):
    x, params = make_inputs("tl6", dtype=dtype, **SHAPES[case])
    check_parity(x, params)


@pytest.mark.parametrize("config", ["tl6", "full"])
def test_adapters_in_compute_dtype(config):
    x, params = make_inputs(config, M=23, K=40, N=70, R=8, dtype=torch.float16, adapter_dtype=torch.float16)
    check_parity(x, params)


def test_deterministic_parity():
    x, params = make_inputs("tl6", M=37, K=40, N=70, R=8, dtype=torch.float32)
    check_parity(x, params, deterministic=True)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M", [5, 29], ids=["decode", "prefill"])
@pytest.mark.parametrize("config", ["full", "vera"])
def test_autocast(config, M, autocast_dtype):
    # fp32 layer and fp32 master adapters under autocast: x, W, b run in the autocast dtype
    x, params = make_inputs(config, M=M, K=40, N=70, R=8, dtype=torch.float32)
    check_parity(x, params, autocast_dtype=autocast_dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M", [5, 37], ids=["decode", "prefill"])
@pytest.mark.parametrize("config", ["tl6", "lora"])
def test_adapter_weights_in_the_input_dtype(config, M, dtype):
    # adapters are float32 (the other tests) or x's dtype (here); the kernels read either as stored. LoRA (no u, v)
    # at decode then reads B as it is, and only the scale (0.5) is left to fold in the kernel
    x, params = make_inputs(config, M=M, K=40, N=70, R=8, dtype=dtype, adapter_dtype=dtype)
    check_parity(x, params)


@pytest.mark.parametrize("N", [24, 48], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_small_integers_are_exact(dtype, N):
    # |every intermediate| <= 4·N + N < 256: exactly representable in bf16 and fp16 and in fp32 accumulation. N = 48
    # takes the tables' aligned tiles (and TMA loads on Hopper), what LLM widths run; N = 24 the unaligned ones
    M, K, R = 37, 32, 4
    g = torch.Generator().manual_seed(0)

    def ints(*shape, lo=-1, hi=2, dt=dtype):
        return torch.randint(lo, hi, shape, generator=g).to(dt).to(DEVICE)

    x = ints(M, K).requires_grad_(True)
    weight, bias = ints(N, K).requires_grad_(True), ints(N).requires_grad_(True)
    A, B = ints(R, K, dt=torch.float32).requires_grad_(True), ints(N, R, dt=torch.float32).requires_grad_(True)
    u = (2 * ints(R, lo=0, dt=torch.float32) - 1).requires_grad_(True)  # ±1
    v = (2 * ints(N, lo=0, dt=torch.float32) - 1).requires_grad_(True)
    dy = ints(M, N)
    assert configs.is_aligned(x, N) == (N == 48) and configs.is_aligned(dy, K) == (N == 48)
    inputs = {"x": x, "weight": weight, "bias": bias, "A": A, "B": B, "u": u, "v": v}
    for deterministic in (False, True):
        y = tied_lora_linear(x, weight, bias, A, B, u, v, 1.0, backend="triton", deterministic=deterministic)
        expected = tied_lora_forward(x, weight, bias, A, B, u, v, 1.0, upcast=True)
        assert torch.equal(y.double(), expected), "y not exact"
        got, ref = grads_of(y, dy, inputs), grads_of(expected, dy.double(), inputs)
        for name in inputs:
            assert torch.equal(got[name].double(), ref[name]), f"d{name} not exact"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # (numpy, in the interpreter)
@pytest.mark.parametrize("where", ["x", "dy", "dy-deterministic", "A", "A-nan-payload", "B", "weight"])
@pytest.mark.parametrize("M,split", [(37, None), (5, 3)], ids=["prefill", "decode-split"])
@pytest.mark.parametrize("config", ["tl6", "vera"])
def test_non_finite_values_land_where_the_float64_reference_puts_them(config, M, split, where):
    """A NaN or an inf in x, dy, A (also a float32 master's NaN of any payload), B or W (a diverging run) gives NaN
    and inf in exactly the outputs and gradients where the float64 reference (the torch path on float64 copies)
    gives them: no masked or padded lane hides one, and none leaks into another row. B's reach y through the rank-R
    term alone, W's through the base GEMM alone (x's and dy's through both). (Not the torch path in bf16: on a CPU
    with AMX, torch 2.13's bf16 GEMM spreads a NaN of dy's row 2 into rows 1 and 3 of dy·W.)"""
    x, params = make_inputs(config, M=M, K=96, N=80, R=16, dtype=torch.bfloat16)
    x, dy = x.detach().clone(), torch.ones(M, 80, dtype=torch.bfloat16, device=DEVICE)
    if where == "x":
        x[3, 7], x[4, 2] = float("nan"), float("inf")
    elif where == "A-nan-payload":  # a NaN of the fp32 master with high payload bits, rounded to bf16 in the kernel
        params["A"] = params["A"].detach().float().clone().requires_grad_(params["A"].requires_grad)
        params["A"].data.view(torch.int32)[1, 3] = 0x7FFFFFFF  # (the interpreter's rounding made it -0.0)
    elif where in ("A", "B", "weight"):
        params[where] = params[where].detach().clone().requires_grad_(params[where].requires_grad)
        params[where].data[1, 3] = float("inf") if where == "A" else float("nan")
    else:
        dy[2, 5], dy[4, 1] = float("nan"), float("-inf")
    deterministic = where == "dy-deterministic"

    def run(backend, dtype=None):
        xs = x.to(dtype or x.dtype, copy=True).requires_grad_(True)
        ps = {k: t if t is None else t.detach().to(dtype or t.dtype, copy=True).requires_grad_(t.requires_grad)
              for k, t in params.items()}  # fmt: skip
        with forcing.forced(split_k=split):
            y = tied_lora_linear(xs, *ps.values(), 0.5, backend=backend, deterministic=deterministic)
        inputs = {"x": xs, **ps}
        return {"y": y.detach(), **grads_of(y, dy.to(y.dtype), inputs)}

    ref, got = run("torch", torch.float64), run("triton")
    assert ref.keys() == got.keys()
    hit = ref["x" if where.startswith("dy") else "y"]  # (dx, or y)
    assert not hit.isfinite().all()  # (the case puts non-finite values where they are compared)
    for name in ref:
        assert torch.equal(got[name].isnan(), ref[name].isnan()), f"{name}: NaN elsewhere than the torch path's"
        assert torch.equal(got[name].isinf(), ref[name].isinf()), f"{name}: inf elsewhere than the torch path's"


@pytest.mark.parametrize("strategy", ["one_pass", "two_pass"])
@pytest.mark.parametrize("M", [5, 40], ids=["decode", "prefill"])
@pytest.mark.parametrize("config", ["tl6", "lora"])
def test_fp16_with_a_small_adapter_term(config, M, strategy):
    """fp16 at s = 1/128 with a small adapter factor — v or LoRA's B near a zero start (|·| ~ 3e-4):
    s·v ⊙ B lies below fp16's normal range (6.1e-5), where it loses digits. The backward applies s in fp32 instead
    of folding it into that fp16 operand (dA had 6× the torch path's error, which applies s in fp32 too)."""
    x, params = make_inputs(config, M=M, K=96, N=80, R=8, dtype=torch.float16)
    small = "v" if config == "tl6" else "B"
    params[small] = (params[small].detach() * 3e-4).requires_grad_(params[small].requires_grad)
    with forcing.forced(strategy=strategy):
        check_parity(x, params, scale=1 / 128)
        # the rule's atol takes magnitudes of at least 1, which these gradients (~1e-3) are far below: here each
        # error is measured against the gradient's own largest value
        args, inputs = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")], {"x": x, **params}
        dy = torch.randn(M, 80, generator=torch.Generator().manual_seed(7)).to(torch.float16).to(DEVICE)
        got = grads_of(tied_lora_linear(x, *args, 1 / 128, backend="triton"), dy, inputs)
    ref = grads_of(tied_lora_forward(x, *args, 1 / 128, upcast=True), dy.double(), inputs)
    base = grads_of(tied_lora_forward(x, *args, 1 / 128), dy, inputs)
    for name in got:
        magnitude = ref[name].abs().max().item()
        err, base_err = max_error(got[name], ref[name]) / magnitude, max_error(base[name], ref[name]) / magnitude
        assert err <= 2 * base_err + 1e-3, f"d{name}: relative error {err:.2e}, the torch path's {base_err:.2e}"


def test_fp64_is_rejected():
    x, params = make_inputs("tl6", M=4, K=16, N=16, R=4, dtype=torch.float64)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    with pytest.raises(TypeError, match=r"float64.*backend='torch'"):
        tied_lora_linear(x, *args, backend="triton")


def test_rank_above_max_is_rejected():
    R = configs.MAX_RANK + 1
    x, params = make_inputs("tl6", M=4, K=R + 3, N=R + 5, R=R, dtype=torch.float32)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    with pytest.raises(ValueError, match=rf"ranks up to {configs.MAX_RANK}, got rank {R}"):
        tied_lora_linear(x, *args, backend="triton")


# every shipped config (both architectures' tables), forced, on a shape that is ragged for all of them
def _family_dtype(wide: bool) -> torch.dtype:
    return torch.float32 if wide else torch.bfloat16


@pytest.mark.parametrize(
    "arch,cfg,block_r,wide", configs.all_fused_configs(), ids=[c[1].name for c in configs.all_fused_configs()]
)
def test_every_fused_config(arch, cfg, block_r, wide):
    dtype = _family_dtype(wide)
    M, K, N, R = 45, 70, 150, block_r - 3 if block_r > 16 else 5
    g = torch.Generator().manual_seed(block_r)
    a = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    w, down = torch.randn(K, N, generator=g).to(dtype).to(DEVICE), torch.randn(K, R, generator=g).to(dtype).to(DEVICE)
    up, bias = torch.randn(R, N, generator=g).to(dtype).to(DEVICE), torch.randn(N, generator=g).to(dtype).to(DEVICE)
    rscale = torch.randn(R, generator=g).to(DEVICE)
    out, t = fused_lora_mm(a, w, down, up, rscale, bias, write_t=True, config=cfg)

    a64, w64, d64, up64 = a.double(), w.double(), down.double(), up.double()
    t_ref = a64 @ d64
    out_ref = a64 @ w64 + (t_ref * rscale.double()) @ up64 + bias.double()
    t_base = (a @ down).float()
    out_base = (a @ w + (t_base * rscale).to(dtype) @ up + bias).to(dtype)
    assert_close_to_reference(t, t_ref, t_base, "t", dtype)
    assert_close_to_reference(out, out_ref, out_base, "out", dtype)


@pytest.mark.parametrize(
    "arch,cfg,block_r,wide", configs.all_rank_grad_configs(), ids=[c[1].name for c in configs.all_rank_grad_configs()]
)
def test_every_rank_grad_config(arch, cfg, block_r, wide):
    dtype = _family_dtype(wide)
    M, C, R = 150, 141, block_r - 3 if block_r > 16 else 5
    g = torch.Generator().manual_seed(block_r)
    a = torch.randn(M, C, generator=g).to(dtype).to(DEVICE)
    p, rscale = torch.randn(M, R, generator=g).to(DEVICE), torch.randn(R, generator=g).to(DEVICE)
    ref = a.double().t() @ (p.double() * rscale.double())
    base = (a.t() @ (p * rscale).to(dtype)).float()
    # the G pass's epilogue: dB = s·v ⊙ G, dv = s·rowsum(B ⊙ G), du = colsum(s·v ⊙ B ⊙ aᵀp) (no rscale)
    s, ovec, rowmat = 0.37, torch.randn(C, generator=g).to(DEVICE), torch.randn(C, R, generator=g).to(DEVICE)
    raw, raw_base = a.double().t() @ p.double(), (a.t() @ p.to(dtype)).float()
    ref_scaled = s * ovec.double()[:, None] * ref
    ref_rowdot = s * (rowmat.double() * ref).sum(1)
    ref_coldot = (s * ovec.double()[:, None] * rowmat.double() * raw).sum(0)
    base_scaled = base * (s * ovec)[:, None]
    base_rowdot, base_coldot = s * (rowmat * base).sum(1), ((s * ovec)[:, None] * rowmat * raw_base).sum(0)
    for deterministic in (False, True):
        what = f"(deterministic={deterministic})"
        out = rank_grad(a, p, rscale, deterministic=deterministic, config=cfg)
        assert out.rowdot is None and out.coldot is None
        assert_close_to_reference(out.out, ref, base, f"out {what}", dtype)
        out_t = rank_grad(a, p, rscale, deterministic=deterministic, transpose_out=True, config=cfg).out
        assert out_t.shape == (R, C) and out_t.is_contiguous()
        assert_close_to_reference(out_t, ref.t(), base.t(), f"out_t {what}", dtype)
        kw = dict(deterministic=deterministic, scale=s, ovec=ovec, rowmat=rowmat, config=cfg)
        full = rank_grad(a, p, rscale, rowdot=True, coldot=True, **kw)
        assert_close_to_reference(full.out, ref_scaled, base_scaled, f"s·v ⊙ out {what}", dtype)
        assert_close_to_reference(full.rowdot, ref_rowdot, base_rowdot, f"rowdot {what}", dtype)
        assert_close_to_reference(full.coldot, ref_coldot, base_coldot, f"coldot {what}", dtype)
        alone = rank_grad(a, p, rscale, write_out=False, coldot=True, **kw)
        assert alone.out is None and alone.rowdot is None
        assert_close_to_reference(alone.coldot, ref_coldot, base_coldot, f"coldot alone {what}", dtype)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a 4 GB activation on a GPU")
def test_int64_offsets():
    # M·K passes 2³¹: row offsets must be computed in int64 (only the last rows would go wrong), forward and backward
    K = 4096
    check_last_rows(2**31 // K + 100, K)


def check_last_rows(M: int, K: int, N: int = 32, R: int = 8, tail: int = 300) -> None:
    """Forward and every gradient of a bf16 layer on ``x [M, K]``, checked on the last ``tail`` rows, where the
    offsets are largest. ``dy`` is zero on the other rows: ``dx`` must be exactly zero there, and the reductions
    over tokens (``dW``, ``dA``, ``dB``, ``du``, ``dv``), which still walk every row, must give the reference's
    gradients of the last rows alone."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16, generator=g)
    w = torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16, generator=g) * K**-0.5
    A = torch.randn(R, K, device=DEVICE, generator=g) * K**-0.5
    B, u, v = (torch.randn(*s, device=DEVICE, generator=g) for s in ((N, R), (R,), (N,)))
    dy = torch.zeros(M, N, device=DEVICE, dtype=torch.bfloat16)
    dy[-tail:] = torch.randn(tail, N, device=DEVICE, generator=g)
    params = {"weight": w, "A": A, "B": B, "u": u, "v": v}
    for t in (x, *params.values()):
        t.requires_grad_(True)
    y = tied_lora_linear(x, w, None, A, B, u, v, backend="triton")
    got = grads_of(y, dy, {"x": x, **params})
    assert torch.count_nonzero(got["x"][:-tail]) == 0, "dx is not zero on the rows whose dy is zero"
    x_tail = x.detach()[-tail:].requires_grad_(True)
    inputs = {"x": x_tail, **params}
    expected = tied_lora_forward(x_tail, w, None, A, B, u, v, upcast=True)
    baseline = tied_lora_forward(x_tail, w, None, A, B, u, v)
    assert_close_to_reference(y[-tail:], expected, baseline, "y (last rows)", torch.bfloat16)
    ref, base = grads_of(expected, dy[-tail:].double(), inputs), grads_of(baseline, dy[-tail:], inputs)
    got["x"] = got["x"][-tail:]
    for name in inputs:
        assert_close_to_reference(got[name], ref[name], base[name], f"d{name} (last rows)", torch.bfloat16)


# Offsets past 2³¹ elements without 4 GB of data: x, dy and W are views with a huge stride into allocations that
# stay mostly untouched (Linux commits only the pages written), so an int32 offset wraps beyond row (or column)
# 2³¹ / stride. Triton's interpreter computes int32 like the GPU (it wraps), so a missing int64 cast reads far
# outside the tensor: it may crash the process, hence a subprocess. Covered: the row offsets of the fused GEMM
# (x, dy, and W's rows at prefill and decode), of the shrink and of the reductions over tokens; the column
# offsets of the reductions (a column-major x); a split-K slice's start (dx at decode over W's rows); K steps
# that pass 2³¹ (a column-major x and dy: copied to row-major by configs.narrow_k_steps, see there). The
# offsets of prepare.py and of the split-K sum index [R, K], [N, R] and [SPLIT, M ≤ 16, N] buffers: int64 there
# is defensive only, these do not reach 2³¹ in real layers (prepare.py's bounds: test_prepare_bounds_past_int32).
_INT64_STRIDE = 2**24 + 2**20  # rows (columns) 121 and up start past 2³¹; BLOCK_K × stride < 2³¹, as for real layers
_INT64_DECODE_STRIDE = 150_000_000  # decode (M = 16): x's row 15 starts past 2³¹
_LONG_K_STEPS_STRIDE = 2**26 + 64  # a stride along K that 32 K steps (the shortest tiles' BLOCK_K) take past 2³¹
_INT64_FORCED = {"two_pass": dict(strategy="two_pass"), "pointers": dict(tma=False), "split": dict(split_k=3)}


def _huge_stride_views(shapes, stride, g, dtype):
    """Random ``[rows, cols]`` views with row stride ``stride``, side by side in one mostly untouched allocation."""
    store = torch.empty((max(r for r, _ in shapes) - 1) * stride + sum(c for _, c in shapes), dtype=dtype)
    views, offset = [], 0
    for rows, cols in shapes:
        views.append(store.as_strided((rows, cols), (stride, 1), offset).copy_(torch.randn(rows, cols, generator=g)))
        offset += cols
    return views


def int64_case(case: str) -> None:
    """Forward and every gradient of one layer whose operands reach offsets past 2³¹ (run in a subprocess)."""
    dtype, R = torch.bfloat16, 8
    g = torch.Generator().manual_seed(5)
    stride = _INT64_STRIDE + (8 if "unaligned" in case else 0)  # unaligned: the unaligned tiles, pointer loads
    if case.startswith("decode"):  # x's rows, W's rows (forward) and dx's K slices over them (split)
        M, N, K = 16, 144, 256
        (x,) = _huge_stride_views([(M, K)], _INT64_DECODE_STRIDE, g, dtype)
        (w,) = _huge_stride_views([(N, K)], stride, g, dtype)
        dy = torch.randn(M, N, generator=g).to(dtype)
    elif case.endswith("column_major"):  # x's columns: dA's reduction walks them
        M, N, K = 144, 32, 144
        x = _huge_stride_views([(K, M)], stride, g, dtype)[0].t()
        w, dy = torch.randn(N, K, generator=g).to(dtype), torch.randn(M, N, generator=g).to(dtype)
    elif case.endswith("long_k_steps"):  # column-major x and dy whose K steps pass 2³¹ (configs.narrow_k_steps)
        M, N, K = 48, 32, 40
        x, dy = (t.t() for t in _huge_stride_views([(K, M), (N, M)], _LONG_K_STEPS_STRIDE, g, dtype))
        w = torch.randn(N, K, generator=g).to(dtype)
    else:  # 144 rows of x, dy and W: aligned, so the default case loads through TMA descriptors
        M, N, K = 144, 144, 32
        x, dy, w = _huge_stride_views([(M, K), (M, N), (N, K)], stride, g, dtype)
    w.mul_(K**-0.5)
    assert max((t.shape[0] - 1) * t.stride(0) + (t.shape[1] - 1) * t.stride(1) for t in (x, w)) >= 2**31
    params = {
        "A": torch.randn(R, K, generator=g) * K**-0.5,
        "B": torch.randn(N, R, generator=g) * R**-0.5,
        "u": 1.0 + 0.5 * torch.randn(R, generator=g),
        "v": torch.randn(N, generator=g),
    }
    inputs = {"x": x.requires_grad_(True), **{k: t.requires_grad_(True) for k, t in params.items()}}
    with forcing.forced(**_INT64_FORCED.get(case.split("-")[-1], {})):
        y = tied_lora_linear(x, w, None, *params.values(), 0.5, backend="triton", deterministic="det" in case)
    expected = tied_lora_forward(x, w, None, *params.values(), 0.5, upcast=True)
    baseline = tied_lora_forward(x, w, None, *params.values(), 0.5)
    assert_close_to_reference(y, expected, baseline, f"y {case}", dtype)
    got, ref, base = grads_of(y, dy, inputs), grads_of(expected, dy.double(), inputs), grads_of(baseline, dy, inputs)
    for name in inputs:
        assert_close_to_reference(got[name], ref[name], base[name], f"d{name} {case}", dtype)


_INT64_CASES = ["prefill", "prefill-two_pass", "prefill-pointers", "prefill-unaligned", "prefill-det",
                "prefill-column_major", "prefill-long_k_steps", "decode", "decode-split"]  # fmt: skip


def int64_cases(cases: list[str]) -> None:
    """``int64_case`` for each of ``cases`` in turn (in a subprocess), each reported on stdout as it starts and
    ends: ``int64 start CASE``, then ``int64 passed CASE`` or ``int64 failed CASE <traceback as JSON>``."""
    for case in cases:
        print(f"int64 start {case}", flush=True)
        try:
            int64_case(case)
        except Exception:  # noqa: BLE001 (reported; the next case runs)
            print(f"int64 failed {case} {json.dumps(traceback.format_exc())}", flush=True)
        else:
            print(f"int64 passed {case}", flush=True)


@pytest.fixture(scope="module")
def int64_failures() -> dict[str, str | None]:
    """Each int64 case's failure (``None``: passed). One subprocess runs every case (a new one costs seconds of
    imports); a case that kills it is failed with its exit code, and a fresh subprocess runs the cases after it."""
    failures: dict[str, str | None] = {}
    todo, root = list(_INT64_CASES), Path(__file__).resolve().parents[1]
    while todo:
        code = f"from tests.test_kernels_parity import int64_cases; int64_cases({todo!r})"
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=root)
        running = None
        for line in run.stdout.splitlines():
            if not line.startswith("int64 "):
                continue
            _, status, case, detail = (line + " ").split(" ", 3)
            if status == "start":
                running = case
            else:
                failures[case], running = (json.loads(detail) if status == "failed" else None), None
        died = f"the subprocess died, exit code {run.returncode}:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
        for case in [running] if running is not None else [c for c in todo if c not in failures]:
            failures[case] = died  # (the case it died in; or, dead before the first or after the last, all left)
        todo = [case for case in todo if case not in failures]
    return failures


@pytest.mark.skipif(DEVICE.type == "cuda", reason="interpreter check; test_int64_offsets covers the GPU")
@pytest.mark.parametrize("case", _INT64_CASES)
def test_int64_offsets_in_the_interpreter(case, int64_failures):
    assert int64_failures[case] is None, f"{case}: {int64_failures[case]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", ["tl6", "vera"])
def test_frozen_input(config, dtype):
    """The first adapted layer of a model gets an input that needs no gradient: dS then comes from the shrink
    kernel (fp32) instead of the dx kernel."""
    x, params = make_inputs(config, M=29, K=40, N=70, R=8, dtype=dtype)
    x.requires_grad_(False)
    check_parity(x, params)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [5, 77], ids=["decode", "prefill"])
def test_weight_stored_in_out(M, dtype):
    """GPT-2's Conv1D stores its weight ``[in, out]``: ``TiedLoRAConv1D`` passes ``weight.t()``, a column-major
    ``[out, in]`` view (the forward then reads ``W`` as ``[K, N]`` row-major, the backward's dx as ``[N, K]``
    column-major). Forward and every gradient, the weight's included, against float64."""
    x, params = make_inputs("full", M=M, K=48, N=80, R=8, dtype=dtype)
    stored = params["weight"].detach().t().contiguous().requires_grad_(True)  # [in, out], as Conv1D keeps it
    params["weight"] = stored.t()
    assert not params["weight"].is_contiguous()
    check_parity(x, params)


def _neg_view(t):
    """``t``'s values as a view with the negative bit set over their negation (as ``z.conj().imag`` is): its storage
    holds ``-t``; gradients reach a leaf of their own."""
    view = torch._neg_view((-t.detach()).requires_grad_(t.requires_grad))
    assert view.is_neg() and torch.equal(view, t)
    return view


@pytest.mark.parametrize("M", [5, 40], ids=["decode", "prefill"])
@pytest.mark.parametrize("name", ["x", "weight", "bias", "A", "B", "u", "v", "dy"])
def test_an_input_with_the_negative_bit(name, M):
    """A tensor with the negative bit set is read as its values, not as its storage (which holds their negation):
    each input in turn (one at a time: two negated factors of one product would cancel), and the output's
    gradient."""
    x, params = make_inputs("full", M=M, K=40, N=70, R=8, dtype=torch.float32)
    if name == "x":
        x = _neg_view(x)
    elif name != "dy":
        params[name] = _neg_view(params[name])
    check_parity(x, params, dy_view=_neg_view if name == "dy" else None)


def test_strided_bias():
    x, params = make_inputs("full", M=9, K=40, N=70, R=8, dtype=torch.float32)
    wide = torch.randn(3 * 70, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    params["bias"] = wide[::3].requires_grad_(False)
    assert not params["bias"].is_contiguous()
    check_parity(x, params)


def test_fp32_with_tf32_allowed():
    """With TF32 allowed for matmuls (torch's switch, either API) fp32 runs the kernels' TF32 dots, held to the rule
    against plain PyTorch with TF32 on: the other fp32 tests hold exact fp32 (torch's default) to IEEE fp32's
    error. On the CPU interpreter, which has no TF32, it is the exact path again; on a GPU it is the TF32 check.
    (One test for both regimes: gpu_check's parity phase stops after three failures.)"""
    # (set and put back by hand: pytest 9.2's monkeypatch restores an instance's __dict__ entry, and torch's
    # cuBLASModule serves these through __getattr__ / __setattr__ with none, so its teardown delattr failed)
    matmul = torch.backends.cuda.matmul
    name, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    old = getattr(matmul, name)
    try:
        setattr(matmul, name, value)
        for M in (5, 40):  # decode, prefill
            x, params = make_inputs("tl6", M=M, K=80, N=72, R=16, dtype=torch.float32)
            check_parity(x, params)
    finally:
        setattr(matmul, name, old)


def test_tf32_setting_read_through_either_api():
    from tied_lora_kernels.kernels.common import _tf32_allowed

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy allow_tf32 switch")
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"  # after this, reading the legacy allow_tf32 raises in torch >= 2.9
        assert _tf32_allowed()
        matmul.fp32_precision = "ieee"
        assert not _tf32_allowed()
    finally:
        matmul.fp32_precision = old


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [5, 40], ids=["decode", "prefill"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_forward_without_autograd(mode, M, dtype):
    """Under no_grad and inference_mode the kernels run without an autograd node (kernels/function.py): the
    output of the forward a backward could follow, bit for bit (the same tiles), and float64's within tolerance."""
    x, params = make_inputs("tl6", M=M, K=40, N=70, R=8, dtype=dtype)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    y_graph = tied_lora_linear(x, *args, 0.5, backend="triton")
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        y = tied_lora_linear(x, *args, 0.5, backend="triton")
    assert y_graph.grad_fn is not None and y.grad_fn is None and not y.requires_grad
    assert torch.equal(y, y_graph.detach())
    expected = tied_lora_forward(x, *args, 0.5, upcast=True)
    assert_close_to_reference(y, expected, tied_lora_forward(x, *args, 0.5), "y", dtype)


def test_func_transforms_and_forward_ad_are_refused_by_name():
    """The kernels read raw storage: vmap would crash in a launcher and a tangent would be dropped silently."""
    import torch.autograd.forward_ad as fwAD

    x, params = make_inputs("tl6", M=6, K=40, N=70, R=8, dtype=torch.float32)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    x = x.detach()
    for transform in (torch.func.vmap, torch.func.jacrev):
        with pytest.raises(RuntimeError, match="torch.func transforms.*backend='torch'"):
            transform(lambda t: tied_lora_linear(t, *args, 0.5, backend="triton"))(x)
    with fwAD.dual_level():
        for grad_mode in (True, False):  # forward-mode AD ignores grad mode: no_grad must not drop the tangent
            with torch.set_grad_enabled(grad_mode), pytest.raises(RuntimeError, match="forward-mode AD"):
                tied_lora_linear(fwAD.make_dual(x, torch.ones_like(x)), *args, 0.5, backend="triton")
        y = tied_lora_linear(x, *args, 0.5, backend="triton")  # no tangent anywhere: an ordinary call
    torch.testing.assert_close(y, tied_lora_linear(x, *args, 0.5, backend="triton"), rtol=0, atol=0)
    # the torch path supports both
    with fwAD.dual_level():
        y_dual = tied_lora_linear(fwAD.make_dual(x, torch.ones_like(x)), *args, 0.5, backend="torch")
        assert fwAD.unpack_dual(y_dual).tangent is not None
    with warnings.catch_warnings():  # (vmap warns when an op has no batching rule and it loops over the batch)
        warnings.simplefilter("error")
        y_vmap = torch.func.vmap(lambda t: tied_lora_linear(t, *args, 0.5, backend="torch"))(x)
    torch.testing.assert_close(y_vmap, tied_lora_linear(x, *args, 0.5, backend="torch"))


def test_no_T_without_autograd():
    """Under no_grad the forward keeps nothing for a backward that cannot come: no fp32 T is written."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Empties(TorchDispatchMode):
        shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name, kwargs = func.overloadpacket.__name__, kwargs or {}
            if name in ("empty", "empty_strided", "zeros"):
                self.shapes.append((tuple(args[0]), kwargs.get("dtype")))
            elif name in ("new_empty", "new_empty_strided", "new_zeros"):  # (args[0] the tensor it is made like)
                self.shapes.append((tuple(args[1]), kwargs.get("dtype") or args[0].dtype))
            return func(*args, **kwargs)

    x, params = make_inputs("tl6", M=12, K=40, N=70, R=8, dtype=torch.float32)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    for grad, expect_t in ((False, False), (True, True)):
        with torch.set_grad_enabled(grad), Empties() as mode:
            tied_lora_linear(x, *args, 0.5, backend="triton")
        assert (((12, 8), torch.float32) in mode.shapes) == expect_t, mode.shapes
