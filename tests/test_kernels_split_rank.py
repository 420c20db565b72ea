"""Where one-pass split-K decode computes its rank-R term (``forcing.split_rank``), against the float64 reference.

"apart" (the default): rank programs in the GEMM's launch compute each K slice's ``t = a_s·down_s`` once, the
other programs only the base partials ``a_s·w_s``, and the sum launch adds the partials and ``t``'s slices in
slice order and then the rank-R term and the bias, rounding the complete ``t`` once (as an unsplit launch
does). "in_tile": every output tile's programs compute and expand their slice's ``t`` (a hi + lo pair). The two
round differently, so each is held to the reference (``tests/helpers.py``'s rule), not to the other. Decode
shapes: M = 1, 5 and 16, K and N multiples of no block (K = 300 is cut 128 + 128 + 44 by three slices, 192 +
108 by two; dx's N = 140 likewise), ranks 1 to 128 (one to four rank programs per slice), fp16 and bf16, with
and without bias, u and v; forward, dx (the same kernels) and every adapter gradient.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.conftest import DEVICE
from tests.helpers import GridSpy, assert_close_to_reference
from tests.test_kernels_parity import check_parity, make_inputs
from tied_lora_kernels.functional import tied_lora_linear
from tied_lora_kernels.kernels import configs, forcing, forward, split_sum
from tied_lora_kernels.kernels.common import cdiv
from tied_lora_kernels.kernels.forward import fused_lora_mm

# (M, R, dtype, split, preset): every M, rank, dtype and split at least twice; "full" trains W and b as well,
# "lora" has no u, v or bias, "vera" trains u and v only (no dS, no dA)
CASES = [
    (1, 1, torch.bfloat16, 3, "tl6"),
    (5, 12, torch.float16, 3, "full"),
    (16, 64, torch.bfloat16, 3, "tl6"),
    (5, 128, torch.float16, 2, "tl6"),
    (16, 12, torch.float16, 2, "lora"),
    (1, 64, torch.float16, 3, "vera"),
    (5, 1, torch.bfloat16, 2, "lora"),
    (16, 128, torch.bfloat16, 3, "full"),
    (1, 12, torch.bfloat16, 2, "tl6"),
]


@pytest.mark.parametrize("split_rank", configs.SPLIT_RANKS)
@pytest.mark.parametrize("M,R,dtype,split,preset", CASES, ids=str)
def test_decode_parity(M, R, dtype, split, preset, split_rank):
    x, params = make_inputs(preset, M=M, K=300, N=140, R=R, dtype=dtype, bias=preset != "lora")
    with forcing.forced(split_k=split, split_rank=split_rank):
        check_parity(x, params)


@pytest.mark.parametrize("R", [12, 64, 128])
def test_rank_apart_is_the_default_and_what_it_launches(monkeypatch, R):
    # forward y and backward dx both split: apart, the GEMM's grid has cdiv(R, 32) rank programs per K slice
    # before its 3 column tiles (N = 140; dx: K = 300, 5 tiles) and the rank sum follows it; the in-kernel
    # sum and a forced "in_tile" keep every program's t and the plain sum launch
    gemms, sums, rank_sums = (GridSpy(getattr(module, k)) for module, k in _KERNELS)
    for (module, name), spy in zip(_KERNELS, (gemms, sums, rank_sums), strict=True):
        monkeypatch.setattr(module, name, spy)
    x, params = make_inputs("tl6", M=4, K=300, N=140, R=R, dtype=torch.bfloat16)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    rank_programs = cdiv(R, min(configs.block_r_for(R), forward.RANK_APART_BLOCK_R))
    counted = []  # the rank programs split_k_for is told of, per launch
    split_k_for = configs.split_k_for
    monkeypatch.setattr(
        configs, "split_k_for", lambda *a, rank_programs=0: counted.append(rank_programs) or split_k_for(*a)
    )
    for forced, apart in ((dict(), True), (dict(split_rank="in_tile"), False), (dict(reduce="kernel"), False)):
        for spy in (gemms, sums, rank_sums):
            spy.grids.clear()
        counted.clear()
        with forcing.forced(split_k=3, **forced):
            y = tied_lora_linear(x, *args, backend="triton")
            y.sum().backward()
        extra = rank_programs if apart else 0
        assert gemms.grids == [(extra + 3, 3), (extra + 5, 3)], (forced, gemms.grids)
        assert counted == [extra, extra], forced
        assert len(rank_sums.grids) == (2 if apart else 0), forced
        assert len(sums.grids) == (0 if apart or "reduce" in forced else 2), forced
    assert configs.DEFAULT_SPLIT_RANK == "apart"


_KERNELS = (
    (forward, "_fused_lora_mm_kernel"),
    (split_sum, "_sum_splits_kernel"),
    (split_sum, "_sum_splits_rank_kernel"),
)


@pytest.mark.parametrize("split_rank", configs.SPLIT_RANKS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("R", [1, 12, 64, 128])
def test_fused_mm_decode_t_and_out(R, dtype, split_rank):
    # the launcher alone, fp32 masters folded in the kernel (the decode forward's arguments), T returned: T is
    # the sum of t's slices (apart: written by the sum launch), y within tolerance of float64
    g = torch.Generator().manual_seed(R)
    M, K, N, s = 7, 300, 140, 0.7

    def randn(*shape, dt=dtype, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dt).to(DEVICE)

    a, w, bias = randn(M, K), randn(K, N, std=K**-0.5), randn(N)
    A, B = randn(R, K, dt=torch.float32, std=K**-0.5), randn(N, R, dt=torch.float32, std=R**-0.5)
    u, v = 1 + randn(R, dt=torch.float32, std=0.5), randn(N, dt=torch.float32)
    with forcing.forced(split_rank=split_rank):
        out, t = fused_lora_mm(a, w, A.t(), B.t(), u, bias, scale=s, cscale=v, write_t=True, split_k=3)
    A_in, svB_in = A.to(dtype).double(), (B * (s * v)[:, None]).to(dtype).double()  # the operands as rounded
    t_ref = a.double() @ A_in.t()
    out_ref = a.double() @ w.double() + (t_ref * u.double()) @ svB_in.t() + bias.double()
    t_base = (a @ A.to(dtype).t()).float()
    out_base = (a @ w + (t_base * u).to(dtype) @ svB_in.t().to(dtype) + bias).to(dtype)
    assert t.dtype == torch.float32 and t.shape == (M, R)
    assert_close_to_reference(t, t_ref, t_base, "t", dtype)
    assert_close_to_reference(out, out_ref, out_base, "out", dtype)


@pytest.mark.parametrize(
    "forced", [dict(split_rank="apart"), dict(split_rank="in_tile"), dict(reduce="kernel")], ids=str
)
@pytest.mark.parametrize("R", [1, 16, 64])
def test_fp16_partials_beyond_its_range(R, forced):
    # fp16, K slices whose partial t reach 4·10^4 to 1.6·10^5 (x > 0, A offset by +c on slice 0's columns and -c
    # on slice 1's) and mostly cancel: the complete t stays in fp16's range, so the unsplit kernel, "apart"
    # (which sums t in fp32 first) and the in-tile forms (each partial a hi + lo pair, scaled by a power of two
    # per row; the in-kernel sum is one) are finite and within tolerance of float64. Rows 0 and 1 stay under 2^15
    g = torch.Generator().manual_seed(R)
    M, K, N, s, c = 5, 300, 140, 0.5, 64.0
    rows = torch.tensor([0.01, 0.1, 4.0, 8.0, 16.0])[:, None]
    a = ((1 + 0.5 * torch.rand(M, K, generator=g)) * rows).half()
    A = torch.randn(R, K, generator=g) * K**-0.5
    A[:, :128] += c
    A[:, 128:256] -= c
    w = (torch.randn(K, N, generator=g) * 0.01 * K**-0.5).half()
    B, u, v = torch.randn(N, R, generator=g) * 0.01 * R**-0.5, 1 + 0.5 * torch.randn(R, generator=g), torch.randn(N)
    a, w, A, B, u, v = (t.to(DEVICE) for t in (a, w, A, B, u, v))
    A_in, svB_in = A.half().double(), (B * (s * v)[:, None]).half().double()  # the operands as rounded
    partials = torch.stack([a[:, k].double() @ A_in[:, k].t() for k in (slice(0, 128), slice(128, 256))])
    t_ref = a.double() @ A_in.t()
    assert partials[:, :2].abs().max() < 2**15 < partials[:, 2:].abs().amax(dim=(0, 2)).min(), partials.abs().max()
    assert t_ref.abs().max() < 2**15, t_ref.abs().max()
    out_ref = a.double() @ w.double() + (t_ref * u.double()) @ svB_in.t()
    t_base = (a @ A.half().t()).float()
    out_base = a @ w + (t_base * u).half() @ svB_in.t().half()
    # the decode forward's arguments (fp32 masters, s and v folded in the kernel), then dx's form of them (down
    # in the input dtype, up an fp32 master with no column scale): the same operands once rounded
    svB = (B * (s * v)[:, None]).t().contiguous()
    forms = {"fwd": (A.t(), B.t(), dict(scale=s, cscale=v)), "dx": (A.half().t(), svB, {})}
    for (form, (down, up, fold)), split in itertools.product(forms.items(), (1, 3)):
        with forcing.forced(strategy="one_pass", **forced):
            out, t = fused_lora_mm(a, w, down, up, u, None, **fold, write_t=True, split_k=split)
        assert_close_to_reference(t, t_ref, t_base, f"{form} t (split {split})", torch.float16)
        assert_close_to_reference(out, out_ref, out_base, f"{form} out (split {split})", torch.float16)


def test_forcing_split_rank(monkeypatch):
    monkeypatch.delenv(forcing.SPLIT_RANK_ENV, raising=False)
    assert forcing.split_rank() == configs.DEFAULT_SPLIT_RANK == "apart"  # an estimate from bytes moved
    monkeypatch.setenv(forcing.SPLIT_RANK_ENV, "in_tile")
    assert forcing.split_rank() == "in_tile"
    with forcing.forced(split_rank="apart"):  # the context manager beats the environment
        assert forcing.split_rank() == "apart"
        with forcing.forced(split_k=2):  # None keeps the enclosing choice
            assert forcing.split_rank() == "apart"
    with forcing.forced(split_rank="auto"):  # "auto": the default, whatever the environment says
        assert forcing.split_rank() == "apart"
    monkeypatch.setenv(forcing.SPLIT_RANK_ENV, "sometimes")
    with pytest.raises(ValueError, match="TIED_LORA_SPLIT_RANK"):
        forcing.split_rank()
    with pytest.raises(ValueError, match="split_rank"):
        forcing.forced(split_rank="both").__enter__()


def test_no_output_columns_still_give_t():
    # N = 0 (never from a layer, whose rank is at most its width): no GEMM tile to launch, the rank-apart sum's
    # grid would be empty and its tile arithmetic divide by zero; the launcher returns an empty y and T from the
    # shrink (the in-tile path returned an unwritten T)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 256, generator=g).to(torch.bfloat16).to(DEVICE)
    A = (torch.randn(16, 256, generator=g) / 16).to(DEVICE)
    for split_rank in configs.SPLIT_RANKS:
        with forcing.forced(split_rank=split_rank):
            out, t = fused_lora_mm(a, a.new_empty(256, 0), A.t(), a.new_empty(16, 0).float(), None, None,
                                   write_t=True, split_k=2)  # fmt: skip
        assert out.shape == (3, 0)
        t_ref = a.double() @ A.to(torch.bfloat16).double().t()
        torch.testing.assert_close(t.double(), t_ref, rtol=1e-5, atol=1e-5)


def test_rank_apart_only_where_its_int32_offsets_reach(monkeypatch):
    # the rank-apart sum indexes t ([M, R]) and up ([R, N] as strided) in int32 (64-bit offsets spilled): past
    # INT32_MAX the launcher keeps the rank-R term in the tiles (int64 offsets), still within tolerance
    fits, edge = split_sum.rank_sum_fits_int32, 2**24  # 2^24 · 128 = 2^31
    up = torch.empty_strided((128, edge), (1, 128), device="meta")  # B [N, 128] transposed: last offset 2^31 - 1
    assert fits(1, 128, up) and not fits(1, 128, torch.empty_strided((128, edge + 1), (1, 128), device="meta"))
    for K, fit in ((16_900_000, True), (17_000_000, False)):  # A [128, K] as dx's up: last offset 127·K + 1
        assert fits(1, 128, torch.empty_strided((128, 2), (K, 1), device="meta")) == fit
    assert fits(edge - 1, 128, up) and not fits(edge, 128, up)  # t: M·R elements
    gemms, sums, rank_sums = (GridSpy(getattr(module, k)) for module, k in _KERNELS)
    for (module, name), spy in zip(_KERNELS, (gemms, sums, rank_sums), strict=True):
        monkeypatch.setattr(module, name, spy)
    monkeypatch.setattr(split_sum, "rank_sum_fits_int32", lambda M, R, up: False)  # (a layer too big to build here)
    x, params = make_inputs("tl6", M=4, K=300, N=140, R=12, dtype=torch.bfloat16)
    with forcing.forced(split_k=3, split_rank="apart"):
        check_parity(x, params)
    assert not rank_sums.grids and len(sums.grids) == 2 and gemms.grids == [(3, 3), (5, 3)], (sums.grids, gemms.grids)
