"""Both fused-GEMM strategies and split-K decode, forced, against the float64 reference (docs/design.md §3, §7).

``kernels/configs.py`` picks one-pass or two-pass per shape from an (unmeasured) table and splits K at
decode; ``test_kernels_parity.py`` runs whatever the table picks. Here each strategy is forced
(``forcing.forced``) through ``tied_lora_linear`` — forward and every gradient, every configuration, fp32,
fp16 and bf16, ragged shapes, M = 0 and 1, ranks 1, 16 and 128 — and split-K with 3 slices is forced on
small decode shapes (K and N both cut into three slices, the last ragged, so both ``y`` and ``dx`` split). The
kernels run in triton's interpreter without a GPU, with bf16 covered as ``test_kernels_parity.py`` explains;
the same tests run the compiled kernels on a GPU.
"""

from __future__ import annotations

import os
import threading
import time
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import DEVICE
from tests.helpers import GridSpy, assert_close_to_reference, programs_reversed
from tests.test_kernels_parity import CONFIGS, check_parity, grads_of, make_inputs
from tied_lora_kernels.functional import tied_lora_linear
from tied_lora_kernels.kernels import backward, configs, forcing, forward, function, prepare, split_sum
from tied_lora_kernels.kernels.forward import fused_lora_mm
from tied_lora_kernels.kernels.prepare import prepare_adapters
from tied_lora_kernels.kernels.shrink import shrink
from tied_lora_kernels.reference import tied_lora_forward

STRATEGIES = list(configs.STRATEGIES)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# every configuration in bf16, and every dtype for TL6 and "full" (everything trains): each strategy
_CONFIG_CASES = [(c, torch.bfloat16) for c in CONFIGS] + [
    (c, dt) for c in ("tl6", "full") for dt in DTYPES if dt != torch.bfloat16
]


@pytest.mark.parametrize("config,dtype", _CONFIG_CASES, ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_configurations(strategy, config, dtype):
    x, params = make_inputs(config, M=37, K=40, N=70, R=8, dtype=dtype, bias=config != "lora")
    with forcing.forced(strategy=strategy):
        check_parity(x, params)


SHAPES = {
    "M0": dict(M=0, K=40, N=70, R=8),
    "M1": dict(M=1, K=40, N=70, R=8),
    "rank1": dict(M=19, K=33, N=45, R=1),
    "rank16": dict(M=19, K=33, N=45, R=16),
    "rank40": dict(M=23, K=50, N=43, R=40),  # three rank chunks in two-pass, the last ragged
    "rank128": dict(M=20, K=130, N=136, R=128),
    "prefill": dict(M=80, K=72, N=90, R=24),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shapes(strategy, case, dtype):
    x, params = make_inputs("tl6", dtype=dtype, **SHAPES[case])
    with forcing.forced(strategy=strategy):
        check_parity(x, params)


# split-K decode with 3 slices of the 64-deep decode tiles' K steps: K = 300 (y) is cut 128 + 128 + 44 and
# N = 140 (dx's reduction) 64 + 64 + 12
@pytest.mark.parametrize(
    "M,config,dtype",
    [(1, "tl6", torch.bfloat16), (5, "full", torch.float16), (16, "vera", torch.bfloat16), (3, "lora", torch.float16)],
    ids=str,
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_split_k_decode(strategy, M, config, dtype):
    x, params = make_inputs(config, M=M, K=300, N=140, R=12, dtype=dtype, bias=config != "lora")
    with forcing.forced(strategy=strategy, split_k=3):
        check_parity(x, params)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_forced_choice_is_applied_and_kept_for_backward(monkeypatch, strategy):
    spy = GridSpy(forward._fused_lora_mm_kernel)
    monkeypatch.setattr(forward, "_fused_lora_mm_kernel", spy)
    shrinks = []
    monkeypatch.setattr(forward, "shrink", lambda *a, **k: shrinks.append(1) or shrink(*a, **k))
    x, params = make_inputs("tl6", M=4, K=300, N=140, R=12, dtype=torch.bfloat16)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    with forcing.forced(strategy=strategy, split_k=3):
        y = tied_lora_linear(x, *args, backend="triton")
    y.sum().backward()  # outside the block: the backward keeps the forward's choice
    assert [g[1] for g in spy.grids] == [3, 3], spy.grids  # forward y and backward dx, both split
    assert len(shrinks) == (2 if strategy == "two_pass" else 0)  # T, then dS


def test_split_k_is_deterministic(monkeypatch):
    # the K slices' partials are summed in slice order, whatever order the slices finish in: on the interpreter
    # (one program at a time) the second run takes them last to first
    x, params = make_inputs("tl6", M=7, K=300, N=140, R=12, dtype=torch.bfloat16)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    inputs = {"x": x, **params}
    runs = []
    for run in range(2):
        if run == 1 and DEVICE.type != "cuda":
            _arrivals_reversed(monkeypatch)
        with forcing.forced(split_k=3):
            y = tied_lora_linear(x, *args, backend="triton", deterministic=True)
        dy = torch.ones_like(y)
        runs.append([y, *grads_of(y, dy, inputs).values()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [5, 40], ids=["decode", "prefill"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_master_weights_are_rounded_in_the_kernel_as_on_the_host(strategy, M, dtype):
    # fp32 A and B with s·v folded in the kernel give, bit for bit, what the host's A.to(dtype) and
    # (s·v ⊙ B).to(dtype) give: the kernel does the same fp32 operations and rounds once, to nearest even
    x, p = make_inputs("tl6", M=M, K=300, N=140, R=12, dtype=dtype)
    x, A, B, u, v, s = x.detach(), p["A"].detach(), p["B"].detach(), p["u"].detach(), p["v"].detach(), 0.7
    weight_t, split = p["weight"].detach().t(), 3 if M <= 16 and dtype != torch.float32 else None
    kw = dict(write_t=True, strategy=strategy, split_k=split)
    host = fused_lora_mm(x, weight_t, A.to(dtype).t(), (B * (s * v)[:, None]).to(dtype).t(), u, None, **kw)
    kernel = fused_lora_mm(x, weight_t, A.t(), B.t(), u, None, scale=s, cscale=v, **kw)
    assert A.dtype == torch.float32 and torch.equal(host[0], kernel[0]) and torch.equal(host[1], kernel[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prepare_rounds_as_torch(dtype):
    # one launch gives, bit for bit, torch's A.to(dtype) and (s·v ⊙ B).to(dtype) (fp32 math, rounded once),
    # from fp32 masters or 16-bit adapters, a grouped layer's rows of B (a strided view) and v = None
    g = torch.Generator().manual_seed(7)
    A, B_all, v = torch.randn(12, 300, generator=g), torch.randn(420, 12, generator=g), torch.randn(140, generator=g)
    A, B_all, v = A.to(DEVICE), B_all.to(DEVICE), v.to(DEVICE)
    for adapter in {torch.float32, dtype}:
        A_, B_ = A.to(adapter), B_all.to(adapter)[140:280]  # rows 140-279 of a grouped B
        for vv, s in ((v.to(adapter), 0.7), (None, 1.3)):
            A_cast, svB = prepare_adapters(A_, B_, vv, s, dtype, cast_a=True)
            fold = s if vv is None else (s * vv.float())[:, None]
            assert torch.equal(A_cast, A_.to(dtype)) and A_cast.is_contiguous()
            assert torch.equal(svB, (B_.float() * fold).to(dtype)) and svB.stride() == (16, 1)
            same, _ = prepare_adapters(A_, B_, vv, s, dtype, cast_a=False)
            assert same is A_


@pytest.mark.parametrize("R", [1, 4, 12, 16, 20])
def test_prepare_zeroes_the_padding_of_sv_B(monkeypatch, R):
    # s·v ⊙ B's rows are padded to 16 elements; a TMA box wider than R (dx's [BLOCK_K, 16] tiles) must find zeros
    # there, whatever the allocator handed back (here: memory full of NaN)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    g = torch.Generator().manual_seed(R)
    A, B, v = torch.randn(R, 64, generator=g), torch.randn(48, R, generator=g), torch.randn(48, generator=g)
    for dtype in DTYPES:
        _, svB = prepare_adapters(A.to(DEVICE), B.to(DEVICE), v.to(DEVICE), 0.5, dtype, cast_a=False)
        rows = svB.as_strided((48, svB.stride(0)), (svB.stride(0), 1))  # the padded storage
        assert torch.equal(rows[:, :R], svB) and not rows[:, R:].isnan().any() and not rows[:, R:].any()


def test_prepare_of_a_zero_width_a_divides_nothing_by_zero():
    # K = 0 (a layer of zero width): A [R, 0] cast to nothing, no lane dividing by K (the interpreter's numpy warned
    # "divide by zero"; a GPU's masked lanes compute it too); s·v ⊙ B still written
    A, B, v = torch.zeros(8, 0, device=DEVICE), torch.randn(40, 8, device=DEVICE), torch.randn(40, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A_cast, svB = prepare_adapters(A, B, v, 0.5, torch.bfloat16, cast_a=True)
    assert A_cast.shape == (8, 0) and A_cast.dtype == torch.bfloat16
    assert torch.equal(svB, (B * (0.5 * v[:, None])).to(torch.bfloat16))


def test_prepare_bounds_past_int32():
    # the first program of a launch over R·K or N·R ≥ 2³¹ elements writes its block: the bounds, passed by the
    # launcher (int64 past 2³¹), do not wrap (computed as int32 products in the kernel, R·K = 2³¹ gave an empty mask:
    # nothing written). Called on one block with stride-0 rows, so that A [128, 2²⁴] and B [2²⁴, 128] cost a row of
    # memory each; the outputs hold that block only
    R, K, N, block = 128, 2**24, 2**24, prepare.PREPARE_BLOCK
    assert R * K >= 2**31 and N * R >= 2**31
    g = torch.Generator().manual_seed(3)
    a_row, b_row = torch.randn(K, generator=g).to(DEVICE), torch.randn(R, generator=g).to(DEVICE)
    A, B = a_row.as_strided((R, K), (0, 1)), b_row.as_strided((N, R), (0, 1))
    v = torch.randn(block // R, generator=g).to(DEVICE)  # the block's rows of v
    a_out, b_out = (torch.full((block,), float("nan"), device=DEVICE) for _ in range(2))
    prepare._prepare_kernel[(1,)](A, B, v, a_out, b_out, R, K, R * K, N * R, *A.stride(), *B.stride(), R, 0.5,
                                  CAST_A=True, HAS_V=True, UPCAST=False, BLOCK=block)  # fmt: skip
    assert torch.equal(a_out, a_row[:block])
    assert torch.equal(b_out.view(-1, R), b_row * (0.5 * v[:, None]))


@pytest.mark.parametrize("M", [4, 40], ids=["decode", "prefill"])
def test_decode_forward_launches_no_host_casts(monkeypatch, M):
    # at decode the fused kernel reads the fp32 master A and B and folds s·v itself; split-K partials are summed
    # by one kernel: no cast, scale or sum runs on the host. Prefill casts A and folds s·v ⊙ B in one launch
    # before the GEMM (prepare.py).
    calls, host_folds = [], []
    real_mm, real_prepare = function.fused_lora_mm, function.prepare_adapters
    monkeypatch.setattr(function, "fused_lora_mm", lambda *a, **k: calls.append((a, k)) or real_mm(*a, **k))
    monkeypatch.setattr(function, "prepare_adapters", lambda *a, **k: host_folds.append(1) or real_prepare(*a, **k))
    sums = GridSpy(split_sum._sum_splits_kernel)
    monkeypatch.setattr(split_sum, "_sum_splits_kernel", sums)
    rank_sums = GridSpy(split_sum._sum_splits_rank_kernel)  # (forcing.split_rank "apart", the default)
    monkeypatch.setattr(split_sum, "_sum_splits_rank_kernel", rank_sums)
    x, params = make_inputs("tl6", M=M, K=300, N=140, R=12, dtype=torch.bfloat16)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    with torch.no_grad(), forcing.forced(split_k=3):
        tied_lora_linear(x, *args, backend="triton")
    ((a, k),) = calls
    down, up = a[2], a[3]
    if M <= configs.DECODE_MAX_M:
        assert down.dtype == up.dtype == torch.float32 and k["cscale"] is params["v"] and k["scale"] == 1.0
        assert not host_folds and not sums.grids and len(rank_sums.grids) == 1
    else:
        assert down.dtype == up.dtype == torch.bfloat16 and "cscale" not in k and host_folds == [1]
        assert not sums.grids and not rank_sums.grids  # prefill never splits K


@pytest.mark.parametrize("split_rank", configs.SPLIT_RANKS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_split_k_partials_that_cancel_are_summed_before_rounding(strategy, split_rank):
    # y = t·up with W = 0, t = x·Aᵀ cut into K slices 128 + 128 + 44 whose partials are 129.5, -128 and 0:
    # 129.5 is not a bf16 number (it would round to 130, giving y = 2), their sum 1.5 is, as is every input.
    # (Two-pass has no partial t — the shrink sums all of K — but must add its rank term in one slice only;
    # one-pass "apart" sums the partials in fp32 before rounding, "in_tile" passes each as a hi + lo pair.)
    K, N = 300, 24
    a = torch.ones(1, K, dtype=torch.bfloat16, device=DEVICE)
    down = torch.zeros(K, 1, dtype=torch.bfloat16, device=DEVICE)
    down[:128] = 1 + 2**-7
    down[0] += 0.5
    down[128:256] = -1
    w = torch.zeros(K, N, dtype=torch.bfloat16, device=DEVICE)
    up = torch.ones(1, N, dtype=torch.bfloat16, device=DEVICE)
    with forcing.forced(split_rank=split_rank):
        out, t = fused_lora_mm(a, w, down, up, None, None, write_t=True, strategy=strategy, split_k=3)
    assert torch.equal(t, torch.full((1, 1), 1.5, device=DEVICE))
    assert torch.equal(out, torch.full((1, N), 1.5, dtype=torch.bfloat16, device=DEVICE)), out


@pytest.mark.parametrize("split_rank", configs.SPLIT_RANKS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fp16_partials_beyond_its_range_that_cancel(strategy, split_rank):
    # as above in fp16, with partials 76800.5, -76800 and 1.5 (row 0) beyond fp16's 65504: every path must give
    # t = 2 and y = 2 (a rounded partial or an infinite one gives 1.5, inf or NaN); row 1's partials (0, 0, 3) are
    # small, in the same tile: one-pass "in_tile" scales each row of its hi + lo pair by its own power of two
    K, N = 300, 24
    a = torch.zeros(2, K, dtype=torch.float16, device=DEVICE)
    a[0] = 1
    a[1, 256] = 2
    down = torch.zeros(K, 1, dtype=torch.float16, device=DEVICE)
    down[:128] = 600
    down[0] += 0.5
    down[128:256] = -600
    down[256] = 1.5
    w = torch.zeros(K, N, dtype=torch.float16, device=DEVICE)
    up = torch.ones(1, N, dtype=torch.float16, device=DEVICE)
    with forcing.forced(split_rank=split_rank):
        out, t = fused_lora_mm(a, w, down, up, None, None, write_t=True, strategy=strategy, split_k=3)
    assert torch.equal(t, torch.tensor([[2.0], [3.0]], device=DEVICE)), t
    expected = torch.tensor([[2.0], [3.0]], dtype=torch.float16, device=DEVICE).expand(2, N)
    assert torch.equal(out, expected), out


@pytest.mark.parametrize("split_rank", configs.SPLIT_RANKS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("M", [37, 5])
def test_small_integers_are_exact(strategy, M, split_rank):
    # as in test_kernels_parity: with integer inputs whose every intermediate stays below 256 in magnitude
    # (sparse x and dy, checked below), bf16 rounds nothing and the result must equal float64 bit for bit;
    # K = 200 is long enough to split K at decode (M = 5)
    K, N, R = 200, 150, 4
    g = torch.Generator().manual_seed(M)

    def ints(*shape, lo=-1, hi=2, dt=torch.bfloat16, sparse=False):
        t = torch.randint(lo, hi, shape, generator=g)
        if sparse:
            t = t * (torch.randint(0, 8, shape, generator=g) == 0)
        return t.to(dt).to(DEVICE)

    x = ints(M, K, sparse=True).requires_grad_(True)
    weight, bias = ints(N, K), ints(N).requires_grad_(True)
    A, B = ints(R, K, dt=torch.float32).requires_grad_(True), ints(N, R, dt=torch.float32).requires_grad_(True)
    u = (2 * ints(R, lo=0, dt=torch.float32) - 1).requires_grad_(True)
    v = (2 * ints(N, lo=0, dt=torch.float32) - 1).requires_grad_(True)
    dy = ints(M, N, sparse=True)
    x64, w64, A64, B64, dy64 = x.double(), weight.double(), A.double(), B.double(), dy.double()
    T, dS = x64 @ A64.t(), dy64 @ B64
    for name, t in (("T", T), ("dS", dS), ("y", x64 @ w64.t() + T @ B64.t()), ("dx", dy64 @ w64 + dS @ A64)):
        assert t.abs().max() + N < 256, f"test inputs too large: |{name}| reaches {t.abs().max()}"
    inputs = {"x": x, "bias": bias, "A": A, "B": B, "u": u, "v": v}
    with forcing.forced(strategy=strategy, split_k=2, split_rank=split_rank):
        y = tied_lora_linear(x, weight, bias, A, B, u, v, 1.0, backend="triton")
        got = grads_of(y, dy, inputs)
    expected = tied_lora_forward(x, weight, bias, A, B, u, v, 1.0, upcast=True)
    assert torch.equal(y.double(), expected), "y not exact"
    ref = grads_of(expected, dy.double(), inputs)
    for name in inputs:
        assert torch.equal(got[name].double(), ref[name]), f"d{name} not exact"


# ---------------------------------------------------------------------------------------------------------
# every shipped config, forced: the split-K launch of each decode config, the multi-chunk rank-R term of each
# two-pass config, each shrink config


def _family_dtype(wide: bool) -> torch.dtype:
    return torch.float32 if wide else torch.bfloat16


def _fused_case(dtype, M, K, N, R, seed):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt).to(DEVICE)

    a, w, down, up, bias, rscale = randn(M, K), randn(K, N), randn(K, R), randn(R, N), randn(N), randn(R, dt=None)
    t_ref = a.double() @ down.double()
    out_ref = a.double() @ w.double() + (t_ref * rscale.double()) @ up.double() + bias.double()
    t_base = (a @ down).float()
    out_base = (a @ w + (t_base * rscale).to(dtype) @ up + bias).to(dtype)
    return (a, w, down, up, rscale, bias), (t_ref, out_ref), (t_base, out_base)


_SPLIT = [c for c in configs.all_fused_configs() if c[1].split_k]
_TWO_PASS = [c for c in configs.all_fused_configs() if c[1].strategy == "two_pass"]


def _skip_other_arch(arch: str) -> None:
    # on a GPU only its own table's configs run (each is a cold JIT compile); the interpreter runs them all,
    # and compile_check compiles them all for their architecture
    if DEVICE.type == "cuda" and arch != configs.arch_of(DEVICE):
        pytest.skip(f"{arch} config: this GPU launches the {configs.arch_of(DEVICE)} table")


@pytest.mark.parametrize("arch,cfg,block_r,wide", _SPLIT, ids=[c[1].name for c in _SPLIT])
def test_every_split_k_config(arch, cfg, block_r, wide):
    _skip_other_arch(arch)
    dtype = _family_dtype(wide)
    R = block_r - 3 if cfg.strategy == "one_pass" else 37  # two-pass: 3 rank chunks
    inputs, (t_ref, out_ref), (t_base, out_base) = _fused_case(dtype, 9, 4 * cfg.block_k + 5, 150, R, block_r)
    for split_rank in configs.SPLIT_RANKS if cfg.strategy == "one_pass" else ("auto",):
        with forcing.forced(split_rank=split_rank):
            out, t = fused_lora_mm(*inputs, write_t=True, split_k=3, config=cfg)
        assert_close_to_reference(t, t_ref, t_base, f"t ({split_rank})", dtype)
        assert_close_to_reference(out, out_ref, out_base, f"out ({split_rank})", dtype)


@pytest.mark.parametrize("arch,cfg,block_r,wide", _TWO_PASS, ids=[c[1].name for c in _TWO_PASS])
def test_every_two_pass_config(arch, cfg, block_r, wide):
    _skip_other_arch(arch)
    dtype = _family_dtype(wide)
    M = 9 if cfg.split_k else 45  # decode configs run decode shapes
    for R in (1, 2 * cfg.rank_chunk + 3):  # one partial chunk; three chunks, the last ragged
        inputs, (t_ref, out_ref), (t_base, out_base) = _fused_case(dtype, M, 70, 150, R, R)
        out, t = fused_lora_mm(*inputs, write_t=True, config=cfg)
        assert_close_to_reference(t, t_ref, t_base, f"t (R={R})", dtype)
        assert_close_to_reference(out, out_ref, out_base, f"out (R={R})", dtype)


@pytest.mark.parametrize(
    "arch,cfg,block_r,wide", configs.all_shrink_configs(), ids=[c[1].name for c in configs.all_shrink_configs()]
)
def test_every_shrink_config(arch, cfg, block_r, wide):
    _skip_other_arch(arch)
    dtype = _family_dtype(wide)
    M, K, R = 70, 2 * cfg.block_k + 7, block_r - 3 if block_r > 16 else 5
    g = torch.Generator().manual_seed(block_r)
    a = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    down = torch.randn(R, K, generator=g).to(dtype).to(DEVICE).t()  # Aᵀ as the forward passes it
    t = shrink(a, down, config=cfg)
    assert t.dtype == torch.float32 and t.shape == (M, R)
    assert_close_to_reference(t, a.double() @ down.double(), (a @ down).float(), "t", dtype)


# ---------------------------------------------------------------------------------------------------------
# the choice itself


def test_default_table():
    dev = torch.device("cpu")  # the interpreter uses the sm90 tables
    assert configs.strategy_for(4096, 16, torch.bfloat16, dev) == "one_pass"
    assert configs.strategy_for(4096, 32, torch.bfloat16, dev) == "two_pass"
    assert configs.strategy_for(4096, 128, torch.bfloat16, dev) == "two_pass"
    assert configs.strategy_for(16, 128, torch.bfloat16, dev) == "one_pass"  # decode
    assert configs.strategy_for(4096, 16, torch.float32, dev) == "two_pass"
    for regime_m in (1, 4096):
        for br in configs.BLOCK_RS:
            for dtype in (torch.bfloat16, torch.float32):
                for strategy in STRATEGIES:
                    assert configs.fused_config(regime_m, br, dtype, dev, strategy).strategy == strategy


def _arrivals_reversed(monkeypatch) -> None:
    """Make the interpreter run a grid's K slices (axis 1) last to first, so that slice 0 arrives last at each tile's
    count (it runs programs one at a time, slice split-1 last otherwise; on a GPU any slice may be last)."""
    programs_reversed(monkeypatch, axes=(1,))


_REDUCE_SHAPES = {"ragged": dict(K=300, N=140), "aligned": dict(K=320, N=192)}  # unaligned tiles, then aligned


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("M", [1, 16])  # a partial row tile (decode's BLOCK_M is 16) and a full one
@pytest.mark.parametrize("shape", list(_REDUCE_SHAPES))
@pytest.mark.parametrize("order", ["in_order", "reversed"])
def test_split_k_summed_in_kernel_equals_the_sum_launch(monkeypatch, order, shape, M, strategy, dtype):
    """forcing.split_reduce "kernel": the last K slice of each output tile to finish sums the partials in the
    GEMM's own launch, in slice order as the sum kernel does after the in-tile GEMM (forcing.split_rank
    "in_tile"; the in-kernel sum is always in-tile). Forward and every gradient (dx splits too) equal
    the launched sum's bit for bit and float64's within tolerance, the sum kernel never launches, and every
    arrival count is back at zero for the next launch; with the slices arriving in either order (interpreter).
    The GPU runs programs concurrently: test_split_k_summed_in_kernel_is_stable_on_gpu."""
    if order == "reversed":
        if DEVICE.type == "cuda":
            pytest.skip("the arrival order is the GPU's own there")
        _arrivals_reversed(monkeypatch)
    K, N = _REDUCE_SHAPES[shape]["K"], _REDUCE_SHAPES[shape]["N"]
    x, params = make_inputs("tl6", M=M, K=K, N=N, R=12, dtype=dtype)
    assert configs.is_aligned(x, N) == (shape == "aligned")
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    inputs = {"x": x, **params}
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    sums = GridSpy(split_sum._sum_splits_kernel)
    monkeypatch.setattr(split_sum, "_sum_splits_kernel", sums)
    results = {}
    for reduce in configs.SPLIT_REDUCES:
        sums.grids.clear()
        with forcing.forced(strategy=strategy, split_k=3, reduce=reduce, split_rank="in_tile"):
            y = tied_lora_linear(x, *args, 0.5, backend="triton")
            results[reduce] = (y, grads_of(y, dy, inputs))
        assert (len(sums.grids) == 0) == (reduce == "kernel"), (reduce, sums.grids)
    (y0, g0), (y1, g1) = results["launch"], results["kernel"]
    assert torch.equal(y0, y1)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name
    assert all(int(locks.count_nonzero()) == 0 for locks in split_sum._SPLIT_LOCKS.values())
    if order == "in_order" and shape == "ragged":
        with forcing.forced(strategy=strategy, split_k=3, reduce="kernel"):
            check_parity(x, params)


def test_split_k_sum_falls_back_to_a_launch_past_the_counts(monkeypatch):
    # more output tiles than arrival counts: the launched sum, the same result
    x, params = make_inputs("tl6", M=2, K=320, N=192, R=12, dtype=torch.bfloat16)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    sums = GridSpy(split_sum._sum_splits_kernel)
    monkeypatch.setattr(split_sum, "_sum_splits_kernel", sums)
    with torch.no_grad(), forcing.forced(split_k=3, reduce="kernel"):
        want = tied_lora_linear(x, *args, backend="triton")
        monkeypatch.setattr(split_sum, "_SPLIT_LOCK_COUNT", 2)  # 3 tiles of 64 columns
        got = tied_lora_linear(x, *args, backend="triton")
    assert len(sums.grids) == 1 and torch.equal(got, want)


def test_split_k_counts_are_made_by_a_thread_of_their_own(monkeypatch):
    """The shared arrival counts are allocated by another thread: torch.compile's CUDA-graph warm-up routes every
    allocation of its own thread to the graph's memory pool, which must not keep a buffer past the graph (on a
    GPU, ``tests/test_cuda_graphs.py`` runs that warm-up). Its exception reaches the caller."""
    made_by = []
    zeros = torch.zeros

    def spy(*args, **kwargs):
        made_by.append(threading.get_ident())
        return zeros(*args, **kwargs)

    monkeypatch.setattr(split_sum, "_SPLIT_LOCKS", {})
    monkeypatch.setattr(torch, "zeros", spy)
    locks = split_sum.split_locks(DEVICE, 3)
    monkeypatch.undo()
    assert locks.dtype == torch.int32 and int(locks.count_nonzero()) == 0
    assert len(made_by) == 1 and made_by[0] != threading.get_ident()
    with pytest.raises(ZeroDivisionError):
        split_sum._in_own_thread(lambda: 1 // 0)


def test_threads_launching_at_once_share_one_split_k_count_buffer(monkeypatch):
    """Two threads' first in-kernel-sum launches on one stream get the same buffer: with one each, the dropped
    buffer would be freed while its kernel may still run (on a GPU, memory the allocator then hands to other work).
    The buffer's making is slowed so that both threads look for it before either has stored it."""
    made = split_sum._in_own_thread
    arrived = threading.Barrier(2)

    def slow(make):
        time.sleep(0.2)
        return made(make)

    monkeypatch.setattr(split_sum, "_SPLIT_LOCKS", {})
    monkeypatch.setattr(split_sum, "_in_own_thread", slow)
    got = [None, None]

    def launch(i):
        arrived.wait()
        got[i] = split_sum.split_locks(DEVICE, 3)

    threads = [threading.Thread(target=launch, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0] is not None and got[0] is got[1] and list(split_sum._SPLIT_LOCKS.values()) == [got[0]]


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="programs only run concurrently on a GPU")
def test_split_k_summed_in_kernel_is_stable_on_gpu():
    """The in-kernel sum's memory ordering on hardware: a tile summed before another slice's partial was visible,
    or a count left non-zero, changes an output. Inputs alternate (so a stale read of the previous launch's
    partials or outputs shows), every output is kept until one synchronize, forward and dx, several shapes and
    splits, two streams at once; the launched sum is the reference, bit for bit."""
    cases = [(1, 4096, 4096, None), (7, 8192, 4096, 16), (16, 4096, 1024, None), (3, 8192, 14336, 32)]
    for M, K, N, split in cases:
        xs, refs = [], []
        _, params = make_inputs("tl6", M=M, K=K, N=N, R=16, dtype=torch.bfloat16)
        args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
        with forcing.forced(split_k=split, reduce="launch", split_rank="in_tile"):  # (as the in-kernel sum)
            for seed in range(3):
                x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).to(DEVICE)
                x.requires_grad_(True)
                y = tied_lora_linear(x, *args, backend="triton")
                (dx,) = torch.autograd.grad(y, x, y.detach())  # dy = y: a split-K dx as well
                xs.append(x)
                refs.append((y.detach(), dx))
        streams = [torch.cuda.current_stream(), torch.cuda.Stream()]
        streams[1].wait_stream(streams[0])  # the inputs and parameters are ready
        got = []
        with forcing.forced(split_k=split, reduce="kernel"):
            for i in range(60):
                x = xs[i % 3]
                with torch.cuda.stream(streams[i % 2]):
                    y = tied_lora_linear(x, *args, backend="triton")
                    (dx,) = torch.autograd.grad(y, x, y.detach())
                got.append((i % 3, y.detach(), dx))
        torch.cuda.synchronize()
        for i, y, dx in got:
            assert torch.equal(y, refs[i][0]) and torch.equal(dx, refs[i][1]), (M, K, N, split, i)
    assert all(int(locks.count_nonzero()) == 0 for locks in split_sum._SPLIT_LOCKS.values())


def test_split_k_is_capped_where_slice_offsets_would_overflow_int32(monkeypatch):
    # the GEMM offsets slice s's partials by s·M·N in int32: a forced split is capped so that split·M·N fits
    # (here a cap of 3·M·N elements stands for 2³¹, which only a huge layer reaches)
    gemms = GridSpy(forward._fused_lora_mm_kernel)
    monkeypatch.setattr(forward, "_fused_lora_mm_kernel", gemms)
    x, params = make_inputs("tl6", M=4, K=768, N=70, R=8, dtype=torch.bfloat16)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    with torch.no_grad(), forcing.forced(split_k=6):
        tied_lora_linear(x, *args, backend="triton")
        monkeypatch.setattr(forward, "SPLIT_ELEMENTS_MAX", 3 * 4 * 70 + 1)
        got = tied_lora_linear(x, *args, backend="triton")
        baseline = tied_lora_linear(x, *args, backend="torch")
    assert [grid[1] for grid in gemms.grids] == [6, 3]
    assert_close_to_reference(got, tied_lora_forward(x, *args, upcast=True), baseline, "y", torch.bfloat16)


def test_narrow_k_steps():
    # which operands are copied to row-major (test_int64_offsets_in_the_interpreter runs one through the kernels)
    long_k = -(-(2**31) // configs.MAX_BLOCK_K)  # the shortest stride along K whose longest step passes 2³¹ - 1
    assert configs.MAX_BLOCK_K == max(
        c.block_k for _, c, _, _ in configs.all_fused_configs() + configs.all_shrink_configs()
    )
    column_major = torch.empty_strided((4, 40), (1, long_k), device="meta")
    copied = configs.narrow_k_steps(column_major)
    assert copied.stride() == (40, 1)
    w = torch.empty_strided((40, 4), (long_k, 1), device="meta")  # w [K, N]: K along dim 0
    assert configs.narrow_k_steps(w, k_dim=0).stride() == (4, 1) and configs.narrow_k_steps(w) is w
    for kept in (
        torch.empty_strided((4, 40), (1, long_k - 1), device="meta"),  # its K steps fit
        torch.empty_strided((4, 40), (1, 2**31), device="meta"),  # triton passes the stride as an int64
        torch.empty_strided((4, 40), (40, 1), device="meta"),
        torch.empty_strided((4, 40), (0, 0), device="meta"),  # expanded
    ):
        assert configs.narrow_k_steps(kept) is kept


def test_split_k_choice():
    dev = torch.device("cpu")
    cfg = configs.fused_config(1, 16, torch.bfloat16, dev)
    # 4096-wide layer at decode: 64 N tiles -> 5 slices (320 programs, >= 2 x 132)
    assert configs.split_k_for(1, 4096, 4096, cfg, dev) == 5
    # r = 64 apart: 2 rank programs per slice besides the 64 tiles -> 4 slices (264 programs)
    assert configs.split_k_for(1, 4096, 4096, cfg, dev, rank_programs=2) == 4
    assert configs.split_k_for(16, 1024, 4096, cfg, dev) == 16  # 16 N tiles: capped at 4 K steps per slice
    assert configs.split_k_for(1, 4096, 128, cfg, dev) == 1  # too short to split
    assert configs.split_k_for(1, 64, 4096, cfg, dev, forced=3) == 3
    # a forced split beyond CUDA's grid y limit (reachable at K > 65,535 K steps) is capped, not a launch error
    assert configs.split_k_for(1, 64, 2**23, cfg, dev, forced=70_000) == configs.GRID_Y_MAX == 65_535
    for M, dtype in ((4096, torch.bfloat16), (1, torch.float32)):  # prefill and fp32 never split
        other = configs.fused_config(M, 16, dtype, dev)
        assert configs.split_k_for(M, 64, 4096, other, dev) == configs.split_k_for(M, 64, 4096, other, dev, 3) == 1


def test_split_k_follows_the_sm_count(monkeypatch):
    """Split-K sizes itself by the GPU's SM count (two waves), not one table per architecture: an H100 PCIe (114
    SMs) splits less than an H200 (132), a B200 (148) more. Off a GPU it assumes an H100 SXM's 132."""
    assert configs.target_programs(torch.device("cpu")) == 264
    cfg = configs.fused_config(1, 16, torch.bfloat16, torch.device("cpu"))
    monkeypatch.setattr(configs, "_capability", lambda device: (9, 0))
    cuda = torch.device("cuda", 0)
    for sms, slices in ((114, 4), (132, 5), (148, 5), (66, 3)):
        monkeypatch.setattr(configs, "_cuda_sm_count", lambda index, sms=sms: sms)
        assert configs.target_programs(cuda) == 2 * sms
        assert configs.split_k_for(1, 4096, 4096, cfg, cuda) == slices, sms


@pytest.mark.parametrize("deterministic", [False, True])
def test_rank_grad_token_split_follows_target_programs(monkeypatch, deterministic):
    """The reduction over tokens splits them into about ``target_programs // column tiles`` slices (each summed by
    atomics, or by a fixed-order sum of per-slice partials), whatever that count, and the result is the same sum."""
    M, C, R = 600, 16, 8
    g = torch.Generator().manual_seed(3)
    a = torch.randn(M, C, generator=g).to(DEVICE)
    p = torch.randn(M, R, generator=g).to(DEVICE)
    ref = a.double().t() @ p.double()
    kernel = GridSpy(backward._rank_grad_kernel)
    monkeypatch.setattr(backward, "_rank_grad_kernel", kernel)
    for programs in (3, 1000):
        monkeypatch.setattr(configs, "target_programs", lambda device, programs=programs: programs)
        out = backward.rank_grad(a, p, None, deterministic=deterministic).out
        assert_close_to_reference(out, ref, a.t() @ p, f"out ({programs} programs)", torch.float32)
    num_m = -(-M // configs.rank_grad_config(16, a.dtype, a.device).block_m)
    assert [grid[1] for grid in kernel.grids] == [3, num_m]


def test_forcing(monkeypatch):
    monkeypatch.delenv(forcing.STRATEGY_ENV, raising=False)
    monkeypatch.delenv(forcing.TMA_ENV, raising=False)
    assert forcing.forced_choice() == (None, None, None)
    monkeypatch.setenv(forcing.STRATEGY_ENV, "two_pass")
    monkeypatch.setenv(forcing.TMA_ENV, "0")
    assert forcing.forced_choice() == ("two_pass", None, False)
    with forcing.forced(strategy="one_pass", split_k=2, tma=True):  # the context manager beats the environment
        assert forcing.forced_choice() == ("one_pass", 2, True)
    assert forcing.forced_choice() == ("two_pass", None, False)
    monkeypatch.setenv(forcing.STRATEGY_ENV, "auto")
    monkeypatch.setenv(forcing.TMA_ENV, "auto")
    assert forcing.forced_choice() == (None, None, None)
    monkeypatch.setenv(forcing.STRATEGY_ENV, "three_pass")
    with pytest.raises(ValueError, match="TIED_LORA_STRATEGY"):
        forcing.forced_choice()
    monkeypatch.delenv(forcing.STRATEGY_ENV)
    monkeypatch.setenv(forcing.TMA_ENV, "yes")
    with pytest.raises(ValueError, match="TIED_LORA_TMA"):
        forcing.forced_choice()
    with pytest.raises(ValueError, match="strategy"):
        forcing.forced(strategy="fast").__enter__()
    with pytest.raises(TypeError, match="tma must be True, False, 'auto' or None"):
        forcing.forced(tma="on").__enter__()
    for bad in (2.5, "3", True, torch.tensor(3)):  # (each used to fail deep in a launcher, or True to mean 1)
        with pytest.raises(TypeError, match="split_k must be an int or None"):
            forcing.forced(split_k=bad).__enter__()
    with pytest.raises(ValueError, match="split_k must be >= 1"):
        forcing.forced(split_k=0).__enter__()
    monkeypatch.delenv(forcing.TMA_ENV)
    with forcing.forced(split_k=np.int64(3)):  # numpy's ints are ints, passed on as Python's
        assert type(forcing.forced_choice()[1]) is int


@pytest.mark.parametrize("fast", [True, False], ids=["environ-mapping", "fallback"])
def test_environment_reads_follow_os_environ(monkeypatch, fast):
    # forcing._getenv reads os.environ's own mapping (a dict lookup, not os.environ.get's encode and KeyError);
    # every change made through os.environ shows at the next read, as with os.environ.get, and so does the
    # fallback where that mapping is absent
    if fast:
        assert forcing._ENV_DATA is not None and set(forcing._ENV_KEYS) == {
            env for env, _ in forcing._ENVIRONMENT.values()
        }, "CPython's os.environ should take the fast path"
    else:
        monkeypatch.setattr(forcing, "_ENV_DATA", None)
    for env, choices in forcing._ENVIRONMENT.values():
        monkeypatch.delenv(env, raising=False)
        assert forcing._getenv(env) is None
        for value in ("", "auto", choices[-1], "bogus-value"):
            monkeypatch.setenv(env, value)
            assert forcing._getenv(env) == value == os.environ.get(env)
        os.environ.pop(env)
        assert forcing._getenv(env) is None
    assert forcing._getenv("TIED_LORA_NOT_A_CHOICE") == os.environ.get("TIED_LORA_NOT_A_CHOICE")
    # os.environ replaced by another mapping (not modified in place): read from that one
    env = next(iter(forcing._ENVIRONMENT.values()))[0]
    monkeypatch.setattr(os, "environ", {env: "replaced"})
    assert forcing._getenv(env) == "replaced"


def test_forcing_auto_beats_the_environment_and_none_keeps_the_enclosing_choice(monkeypatch):
    """``forced(strategy="auto")`` means the table's default even where the environment forces another; None
    leaves a choice as it is outside the block, so a nested ``forced(split_k=...)`` keeps the outer strategy."""
    monkeypatch.setenv(forcing.STRATEGY_ENV, "two_pass")
    monkeypatch.setenv(forcing.TMA_ENV, "0")
    monkeypatch.setenv(forcing.SPLIT_REDUCE_ENV, "kernel")
    with forcing.forced(strategy="auto", tma="auto", reduce="auto"):
        assert forcing.forced_choice() == (None, None, None)
        assert forcing.split_reduce() == configs.DEFAULT_SPLIT_REDUCE
    with forcing.forced(split_k=2):  # the environment still decides what is not given
        assert forcing.forced_choice() == ("two_pass", 2, False)
        assert forcing.split_reduce() == "kernel"
    with forcing.forced(strategy="one_pass", tma=True, reduce="launch"):
        with forcing.forced(split_k=3):
            assert forcing.forced_choice() == ("one_pass", 3, True)
            assert forcing.split_reduce() == "launch"
        with forcing.forced(strategy="auto"):
            assert forcing.forced_choice() == (None, None, True)
        assert forcing.forced_choice() == ("one_pass", None, True)
    assert forcing.forced_choice() == ("two_pass", None, False)


def test_split_reduce_choice(monkeypatch):
    monkeypatch.delenv(forcing.SPLIT_REDUCE_ENV, raising=False)
    assert forcing.split_reduce() == configs.DEFAULT_SPLIT_REDUCE == "launch"  # until a GPU has timed both
    monkeypatch.setenv(forcing.SPLIT_REDUCE_ENV, "kernel")
    assert forcing.split_reduce() == "kernel"
    with forcing.forced(reduce="launch"):  # the context manager beats the environment
        assert forcing.split_reduce() == "launch"
    monkeypatch.setenv(forcing.SPLIT_REDUCE_ENV, "auto")
    assert forcing.split_reduce() == "launch"
    monkeypatch.setenv(forcing.SPLIT_REDUCE_ENV, "atomics")
    with pytest.raises(ValueError, match="TIED_LORA_SPLIT_REDUCE"):
        forcing.split_reduce()
    # every triton call checks it (forced_choice), not only a launch that splits K: an fp32 prefill too
    x, params = make_inputs("tl6", M=40, K=32, N=24, R=4, dtype=torch.float32)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    with pytest.raises(ValueError, match="TIED_LORA_SPLIT_REDUCE"):
        tied_lora_linear(x, *args, backend="triton")
    monkeypatch.delenv(forcing.SPLIT_REDUCE_ENV)
    monkeypatch.setenv(forcing.SPLIT_RANK_ENV, "both")
    with pytest.raises(ValueError, match="TIED_LORA_SPLIT_RANK"):
        tied_lora_linear(x, *args, backend="triton")
    monkeypatch.delenv(forcing.SPLIT_RANK_ENV)
    monkeypatch.setenv(forcing.SPLIT_REDUCE_ENV, "atomics")
    with forcing.forced(reduce="kernel"):  # forcing wins over the environment, whatever it holds
        assert forcing.split_reduce() == "kernel"
    with pytest.raises(ValueError, match="reduce"):
        forcing.forced(reduce="atomics").__enter__()


# ---------------------------------------------------------------------------------------------------------
# TMA loads (configs.tma_for, forward._descriptors): the fused GEMM's a, w and down tiles through descriptors


@pytest.fixture
def descriptor_calls(monkeypatch):
    """Whether each launch of the fused GEMM that tried TMA got its descriptors (False: pointer loads)."""
    calls = []
    real = forward._descriptors

    def spy(*args, **kwargs):
        loads = real(*args, **kwargs)
        calls.append(loads is not None)
        return loads

    monkeypatch.setattr(forward, "_descriptors", spy)
    return calls


def _operands(orientation, dtype, M, K, N, R):
    """``a, w, down, up, rscale, bias`` laid out as the autograd Function passes them: the forward reads ``W``
    and ``A`` transposed, the backward's dx reads ``W`` as stored and ``s·v ⊙ B`` with a 16-padded row."""
    g = torch.Generator().manual_seed(R)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt).to(DEVICE)

    a = randn(M, K)
    if orientation == "forward":
        w, down = randn(N, K).t(), randn(R, K).t()
    else:
        w, down = randn(K, N), torch.empty(K, -(-R // 16) * 16, dtype=dtype, device=DEVICE)[:, :R]
        down.copy_(randn(K, R))
    return a, w, down, randn(R, N), randn(R, dt=torch.float32), randn(N)


@pytest.mark.parametrize("R", [3, 29, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("orientation", ["forward", "backward"])
def test_tma_loads_against_float64_and_pointer_loads(orientation, strategy, dtype, R, descriptor_calls):
    # ragged against every tile; K and N multiples of 16 (TMA needs 16-byte rows; the launcher gives widths
    # that are not multiples of 16 its unaligned tiles, compiled for pointer loads)
    M, K, N = 45, 208, 144
    ops = _operands(orientation, dtype, M, K, N, R)
    a, w, down, up, rscale, bias = ops
    t_ref = a.double() @ down.double()
    out_ref = a.double() @ w.double() + (t_ref * rscale.double()) @ up.double() + bias.double()
    t_base = (a @ down).float()  # plain PyTorch in the input dtype
    out_base = a @ w + (t_base * rscale).to(dtype) @ up + bias
    for tma in (True, False):
        out, t = fused_lora_mm(*ops, write_t=True, strategy=strategy, tma=tma)
        assert_close_to_reference(t, t_ref, t_base, f"t (tma={tma})", dtype)
        assert_close_to_reference(out, out_ref, out_base, f"out (tma={tma})", dtype)
    assert descriptor_calls == [True], "TMA was not used"  # the pointer launch does not try


def test_tma_falls_back_to_pointers(descriptor_calls):
    # K = 70 (not a multiple of 16): the unaligned tiles, pointer loads, still correct
    ops = _operands("forward", torch.bfloat16, 45, 70, 144, 8)
    out, _ = fused_lora_mm(*ops, write_t=False, tma=True)
    assert descriptor_calls == []
    a, w, down, up, rscale, bias = (t.double() for t in ops)
    expected = a @ w + ((a @ down) * rscale) @ up + bias
    assert_close_to_reference(out, expected, None, "out", torch.bfloat16)
    # operands TMA could load (K = 208) but for a: strided (no unit-stride dim) and column-major take the
    # unaligned tiles; broadcast (row stride 0, as autograd hands dy for y.sum(0)) is refused a descriptor
    # -> pointers, still correct
    a, *rest = _operands("backward", torch.bfloat16, 45, 208, 144, 8)
    for odd in (a.repeat(1, 2)[:, ::2], a.t().contiguous().t(), a[:1].expand(45, 208)):
        out, _ = fused_lora_mm(odd, *rest, write_t=False, tma=True)
        w, down, up, rscale, bias = (t.double() for t in rest)
        x = odd.double()
        assert_close_to_reference(out, x @ w + ((x @ down) * rscale) @ up + bias, None, "out", torch.bfloat16)
    fused_lora_mm(a, *rest, write_t=False, tma=True)  # (and the same operands with a row-major a do use TMA)
    assert descriptor_calls == [False, True]
    # fp32 inputs and split-K never try
    fused_lora_mm(*(t.float() for t in _operands("forward", torch.float32, 45, 208, 144, 8)), write_t=False, tma=True)
    fused_lora_mm(*_operands("forward", torch.bfloat16, 5, 400, 144, 8), write_t=False, split_k=3, tma=True)
    assert len(descriptor_calls) == 2


@pytest.mark.parametrize("M", [5, 40], ids=["decode", "prefill"])
def test_unaligned_widths_get_their_own_tiles(M, monkeypatch):
    # N, K or x's row stride not a multiple of 16: the tiles compiled without divisibility hints; aligned
    # widths: the tables' tiles. fp32 has one table for both (its tiles do not spill unhinted)
    tiles = []
    real = forward._fused_lora_mm_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tiles.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_K"]))
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(forward, "_fused_lora_mm_kernel", Spy())
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    strategy = configs.strategy_for(M, 16, bf16, cpu)
    want = []
    for K, N, aligned in ((64, 144, True), (72, 144, False), (64, 136, False)):
        out, _ = fused_lora_mm(*_operands("forward", bf16, M, K, N, 8), write_t=False)
        assert configs.is_aligned(torch.empty(M, K), N) == aligned and out.shape == (M, N)
        cfg = configs.fused_config(M, 16, bf16, cpu, strategy, aligned)
        assert cfg.aligned == aligned
        want.append((cfg.block_m, cfg.block_n, cfg.block_k))
    assert tiles == want and want[0] != want[1]
    assert not configs.is_aligned(torch.empty(M, 128)[:, ::2], 144)  # strided x
    assert not configs.is_aligned(torch.empty(64, M).t(), 144)  # column-major x
    assert not configs.is_aligned(torch.empty(M, 72)[:, :64], 144)  # a row stride of 72
    assert not configs.is_aligned(torch.empty(M * 64 + 1, dtype=bf16)[1:].view(M, 64), 144)  # odd address
    assert configs.fused_config(M, 16, torch.float32, cpu, "two_pass", False).aligned  # fp32: one table


def test_tma_policy(monkeypatch):
    cpu, bf16 = torch.device("cpu"), torch.bfloat16  # the interpreter gets the sm90 table
    assert configs.tma_for(4096, bf16, cpu, split=1)  # 16-bit prefill: on by default
    # decode: never, forced or not (the compile check compiles TMA variants of the prefill configs only)
    assert not configs.tma_for(8, bf16, cpu, split=1) and not configs.tma_for(8, bf16, cpu, split=1, forced=True)
    assert configs.tma_for(17, bf16, cpu, split=1, forced=True)
    assert not configs.tma_for(4096, bf16, cpu, split=1, forced=False)
    assert not configs.tma_for(4096, torch.float32, cpu, split=1, forced=True)  # fp32: never
    assert not configs.tma_for(8, bf16, cpu, split=3, forced=True)  # split-K: never
    # on a GPU: Hopper only (not Ampere, Ada, Blackwell), forced or not
    for cc, hopper in (((9, 0), True), ((8, 0), False), ((8, 9), False), ((10, 0), False), ((12, 0), False)):
        monkeypatch.setattr(configs, "_cuda_capability", lambda index, cc=cc: cc)
        cuda = torch.device("cuda", 0)
        assert configs.tma_for(4096, bf16, cuda, split=1) is hopper
        assert configs.tma_for(4096, bf16, cuda, split=1, forced=True) is hopper


@pytest.mark.parametrize("tma", [None, False], ids=["default", "forced-off"])
def test_tma_choice_is_kept_for_backward(tma, descriptor_calls):
    x, params = make_inputs("tl6", M=40, K=64, N=48, R=8, dtype=torch.bfloat16)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    with forcing.forced(tma=tma):
        y = tied_lora_linear(x, *args, backend="triton")
    y.backward(torch.randn_like(y))  # outside the block: the backward keeps the forward's choice
    assert descriptor_calls == ([True, True] if tma is None else [])  # forward y, backward dx


def test_forced_tma_leaves_decode_on_pointer_loads(descriptor_calls):
    # TIED_LORA_TMA=1 (or forced(tma=True)) set for a training run also reaches generate's decode steps: they keep
    # pointer loads, as no decode TMA variant is compile-checked. K = 128 is not split at M = 4, so only the
    # regime decides; the backward's dx at decode, and a prefill forward, beside it
    x, params = make_inputs("tl6", M=4, K=128, N=48, R=8, dtype=torch.bfloat16)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    cfg = configs.fused_config(4, 16, x.dtype, x.device, "one_pass")
    assert cfg.split_k and configs.split_k_for(4, 48, 128, cfg, x.device) == 1
    with forcing.forced(tma=True):
        y = tied_lora_linear(x, *args, backend="triton")
        y.backward(torch.randn_like(y))
        assert descriptor_calls == []
        tied_lora_linear(torch.cat([x] * 5), *args, backend="triton")  # M = 20: prefill takes them
    assert descriptor_calls == [True]


@pytest.mark.parametrize("config,M,R", [("lora", 20, 100), ("tl6", 1, 65), ("vera", 5, 128)], ids=str)
def test_exact_fp32_rank_tile_128_runs_in_halves(config, M, R):
    # one-pass exact fp32 at rank tile 128 expands t as two 64-rank dots (rank_terms._add_rank_update): ranks
    # past R masked in the second half, or in both; with and without u and v
    x, params = make_inputs(config, M=M, K=70, N=45, R=R, dtype=torch.float32, bias=config != "lora")
    assert configs.block_r_for(R) == 128
    with forcing.forced(strategy="one_pass"):
        check_parity(x, params)


def test_a_k_stride_of_int32_max_is_narrowed():
    # triton passes 2^31 - 1 as an int32, and every K step past the first would wrap: copied (catches: "> stride")
    t = torch.empty_strided((4, 40), (1, configs.INT32_MAX), device="meta")
    assert configs.narrow_k_steps(t) is not t and configs.narrow_k_steps(t).stride() == (40, 1)


def test_unaligned_dropout_launches_keep_the_unaligned_tiles():
    # the dropout tiles are aligned-only (compiled with divisibility hints): an unaligned 16-bit dropout launch gets
    # the unaligned two-pass tiles (catches: "aligned and" dropped from fused_config's dropout branch)
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    aligned = configs.fused_config(40, 16, bf16, cpu, "two_pass", True, dropout=True)
    unaligned = configs.fused_config(40, 16, bf16, cpu, "two_pass", False, dropout=True)
    assert aligned.name.endswith("-dropout") and unaligned.aligned is False
    assert unaligned == configs.fused_config(40, 16, bf16, cpu, "two_pass", False)


def test_unaligned_dropout_shrinks_keep_the_unaligned_tiles():
    # likewise the shrink that draws the mask: the unaligned tiles serve unaligned dropout launches (catches: the
    # unaligned branch of shrink_config skipped for dropout)
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    for block_r in configs.BLOCK_RS:
        cfg = configs.shrink_config(block_r, bf16, cpu, aligned=False, dropout=True)
        assert cfg.aligned is False and cfg == configs.shrink_config(block_r, bf16, cpu, aligned=False)
        assert configs.shrink_config(block_r, bf16, cpu, dropout=True).name.endswith("-dropout")
