"""Adapter dropout in the fused kernels (``kernels/dropout.py``): the mask they draw, and the forward and every
gradient against the float64 reference evaluated with that mask.

The mask is pinned twice: the bits the shrink stores equal ``reference.dropout_keep`` (an independent int64
PyTorch Philox4x32-10), and the layer's output and gradients, drawn from a seed set by ``torch.manual_seed``,
match the reference run on ``x`` for the base and on ``x ⊙ m / (1 - p)`` for the adapter, with ``m`` recomputed
from the same seed. bf16 is covered as in ``test_kernels_parity.py``; the mask itself is integer arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from tests.conftest import DEVICE
from tests.helpers import assert_close_to_reference
from tests.test_kernels_parity import DTYPES, grads_of, make_inputs
from tied_lora_kernels import reference
from tied_lora_kernels.functional import tied_lora_linear
from tied_lora_kernels.kernels import configs, forcing
from tied_lora_kernels.kernels.dropout import draw_seed, new_mask
from tied_lora_kernels.kernels.shrink import shrink

ARGS = ("weight", "bias", "A", "B", "u", "v")


def unpack(bits: torch.Tensor, K: int) -> torch.Tensor:
    """``[M, ceil(K/8)]`` uint8 → ``[M, ceil(K/8)·8]`` bool: bit ``k mod 8`` of byte ``k div 8``."""
    cols = torch.arange(bits.shape[1] * 8, device=bits.device)
    return ((bits.long()[:, cols // 8] >> (cols % 8)) & 1).bool()


@pytest.mark.parametrize(
    "M,K,p", [(37, 40, 0.3), (5, 13, 0.5), (64, 300, 0.1), (3, 200, 0.9), (1, 7, 0.05), (70, 256, 0.25)]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shrink_draws_the_reference_mask(M, K, p, dtype):
    """The stored bits are Philox's mask for the seed (columns past K stay zero), and ``T = c·(m ⊙ x)·Aᵀ``."""
    g = torch.Generator().manual_seed(M + K)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    A = (torch.randn(16, K, generator=g) * K**-0.5).to(dtype).to(DEVICE)
    drop = new_mask(p, M, K, x.device)
    t = shrink(x, A.t(), dropout=drop)
    keep = reference.dropout_keep(int(drop.seed), M, K, p).to(DEVICE)
    bits = unpack(drop.bits, K)
    assert torch.equal(bits[:, :K], keep) and not bits[:, K:].any()
    expected = (x.double() * keep / (1 - p)) @ A.double().t()
    baseline = (x * keep).to(dtype).float() @ A.float().t() / (1 - p)  # the same products, fp32 sums
    assert_close_to_reference(t, expected, baseline, "T", dtype)


def test_a_mask_drawn_without_its_bits_refuses_to_be_read_back():
    drop = new_mask(0.5, 4, 16, DEVICE, keep=False)
    assert drop.bits is None
    with pytest.raises(RuntimeError, match="without keeping its bits"):
        drop.kept_bits()
    assert new_mask(0.5, 4, 16, DEVICE).kept_bits().shape == (4, 2)


def test_keep_threshold_at_an_entrys_own_draw():
    """An entry is kept when its 31-bit draw reaches ``round(p · 2³¹)``: kept at ``p = draw / 2³¹``, dropped a
    three-quarter step above (which rounds up to the next threshold), in the kernels as in the reference."""
    from tied_lora_kernels.reference import _philox4x32_10

    seed, M, K = 12345, 4, 16
    zero = torch.zeros(1, dtype=torch.int64)
    draw = int(_philox4x32_10(zero, zero, zero, zero, seed)[0]) >> 1  # entry (0, 0): counter 0, output 0
    for p, kept in ((draw / 2**31, True), ((draw + 0.75) / 2**31, False)):
        drop = new_mask(p, M, K, DEVICE, torch.tensor([seed], device=DEVICE))
        shrink(torch.ones(M, K, device=DEVICE), torch.ones(16, K, device=DEVICE).t(), dropout=drop)
        keep = reference.dropout_keep(seed, M, K, p)
        assert bool(keep[0, 0]) == kept and torch.equal(unpack(drop.bits, K)[:, :K].cpu(), keep)


def test_reference_philox_known_answers():
    """``reference.dropout_keep``'s generator is Philox4x32-10: Random123's known-answer vectors (kat_vectors)."""
    from tied_lora_kernels.reference import _philox4x32_10

    def draw(counter, key):
        out = _philox4x32_10(*(torch.tensor([c], dtype=torch.int64) for c in counter), key)
        return [f"{int(t):08x}" for t in out]

    assert draw([0, 0, 0, 0], 0) == ["6627e8d5", "e169c58d", "bc57ac4c", "9b00dbd8"]
    assert draw([0xFFFFFFFF] * 4, 0xFFFFFFFF_FFFFFFFF) == ["408f276d", "41c83b0e", "a20bc7c6", "6d5451fd"]
    pi = [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]
    assert draw(pi, 0x299F31D0 << 32 | 0xA4093822) == ["d16cfe09", "94fdcceb", "5001e420", "24126ea1"]


def test_reference_mask_statistics():
    """The keep rate is 1 - p within 5 standard deviations, for every Philox output lane (k mod 4); seeds, rows
    and columns decorrelate; the mask depends on the seed and position only."""
    M, K = 256, 1024
    for p in (0.05, 0.3, 0.5):
        keep = reference.dropout_keep(12345, M, K, p).double()
        sd = (p * (1 - p) / (M * K / 4)) ** 0.5
        for lane in range(4):
            assert abs(keep[:, lane::4].mean().item() - (1 - p)) < 5 * sd, (p, lane)
        centred = keep - keep.mean()
        rows = (centred[:-1] * centred[1:]).mean() / centred.var()
        cols = (centred[:, :-1] * centred[:, 1:]).mean() / centred.var()
        assert abs(rows) < 0.02 and abs(cols) < 0.02
    a, b = reference.dropout_keep(1, M, K, 0.5), reference.dropout_keep(2, M, K, 0.5)
    assert 0.45 < (a == b).double().mean() < 0.55  # two seeds agree as often as chance
    assert torch.equal(reference.dropout_keep(7, 3, K, 0.5), reference.dropout_keep(7, M, K, 0.5)[:3])
    # seeds use both 32-bit halves of the key
    assert not torch.equal(reference.dropout_keep(2**40 + 1, 4, 64, 0.5), reference.dropout_keep(1, 4, 64, 0.5))


def check_dropout_parity(x, params, p, *, scale=0.5, deterministic=False, seed=11):
    """Triton forward and every gradient with dropout ``p`` vs float64 with the mask drawn from the same seed."""
    dtype = x.dtype
    args = [params[k] for k in ARGS]
    inputs = {"x": x, **params}
    torch.manual_seed(seed)
    y = tied_lora_linear(x, *args, scale, backend="triton", deterministic=deterministic, dropout=p)
    torch.manual_seed(seed)
    K = x.shape[-1]
    keep = reference.dropout_keep(int(draw_seed(x.device)), x.numel() // K, K, p).to(x.device).reshape(x.shape)
    assert 0 < keep.sum() < keep.numel() or keep.numel() < 8 or not 0.05 <= p <= 0.95  # (a mask, not all or none)

    def layer(x_, cast):
        w, b = (t if t is None else cast(t) for t in args[:2])
        base = F.linear(cast(x_), w, b)
        dropped, upcast = cast(x_) * keep / (1 - p), cast(x_).dtype == torch.float64
        return base + reference.tied_lora_forward(dropped, torch.zeros_like(w), None, *args[2:], scale, upcast=upcast)

    expected = layer(x, lambda t: t.double())
    baseline = layer(x, lambda t: t)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEVICE)
    assert_close_to_reference(y, expected, baseline, "y", dtype)
    got, ref, base = grads_of(y, dy, inputs), grads_of(expected, dy.double(), inputs), grads_of(baseline, dy, inputs)
    for name in got:
        assert_close_to_reference(got[name], ref[name], base[name], f"d{name}", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", ["lora", "tl6", "vera", "full"])
@pytest.mark.parametrize("M", [5, 37], ids=["decode", "prefill"])
def test_configurations(M, config, dtype):
    x, params = make_inputs(config, M=M, K=40, N=70, R=8, dtype=dtype, bias=config != "lora")
    check_dropout_parity(x, params, 0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "M,K,N,R",
    [(0, 40, 24, 4), (1, 33, 20, 1), (16, 64, 48, 16), (17, 24, 9, 3), (70, 129, 130, 128), (40, 256, 64, 32)],
    ids=str,
)
def test_shapes(M, K, N, R, dtype):
    """Ragged widths (the bits' last byte part empty), one token, every rank tile, decode split-K (M ≤ 16)."""
    x, params = make_inputs("tl6", M=M, K=K, N=N, R=R, dtype=dtype)
    check_dropout_parity(x, params, 0.2)


@pytest.mark.parametrize("p", [1e-9, 0.999])
def test_extreme_probabilities(p):
    """Nearly nothing dropped (the keep threshold rounds to 2) and nearly everything (kept entries scaled 1000×)."""
    x, params = make_inputs("tl6", M=40, K=64, N=24, R=4, dtype=torch.float32)
    check_dropout_parity(x, params, p)


@pytest.mark.parametrize("deterministic", [False, True])
def test_three_d_strided_and_deterministic(deterministic):
    x, params = make_inputs("tl6", M=0, K=40, N=24, R=5, dtype=torch.float32, lead=(3, 7), strided=True)
    check_dropout_parity(x, params, 0.5, deterministic=deterministic)


@pytest.mark.parametrize("strategy", configs.STRATEGIES)
def test_forced_one_pass_still_drops(strategy):
    """A dropout forward runs two-pass whatever is forced (the shrink draws the mask); the backward likewise."""
    x, params = make_inputs("tl6", M=37, K=40, N=70, R=8, dtype=torch.float16)
    with forcing.forced(strategy=strategy, split_k=2):
        check_dropout_parity(x, params, 0.3)


def test_split_k_decode_with_in_kernel_sum():
    x, params = make_inputs("tl6", M=3, K=128, N=64, R=8, dtype=torch.bfloat16)
    with forcing.forced(split_k=4, reduce="kernel"):
        check_dropout_parity(x, params, 0.4)


def test_same_seed_same_result_and_fresh_draws():
    """``torch.manual_seed`` fixes the mask (bit-identical results); consecutive calls draw new masks; under
    ``no_grad`` the output equals the graph forward's."""
    x, params = make_inputs("tl6", M=20, K=48, N=32, R=4, dtype=torch.float32)
    args = [params[k] for k in ARGS]
    torch.manual_seed(3)
    y1 = tied_lora_linear(x, *args, 0.5, backend="triton", dropout=0.5)
    y2 = tied_lora_linear(x, *args, 0.5, backend="triton", dropout=0.5)
    torch.manual_seed(3)
    y3 = tied_lora_linear(x, *args, 0.5, backend="triton", dropout=0.5)
    assert torch.equal(y1, y3) and not torch.equal(y1, y2)
    torch.manual_seed(3)
    with torch.no_grad():
        assert torch.equal(tied_lora_linear(x, *args, 0.5, backend="triton", dropout=0.5), y1)


@pytest.mark.parametrize("x_grad", [True, False])
def test_mask_kept_only_for_dx_and_da(x_grad):
    """The bits are kept for a backward that computes dx or dA (their readers) and only then: VeRA (A frozen)
    keeps them while x needs a gradient, and keeps nothing but T without; TL6 (A trains) keeps x and them either
    way."""
    from tests.test_kernels_memory import saved_activation_bytes

    x, params = make_inputs("vera", M=33, K=40, N=24, R=4, dtype=torch.bfloat16)
    x.requires_grad_(x_grad)
    nbytes, saved = saved_activation_bytes(x, params, dropout=0.3)
    assert nbytes == 4 * 33 * 4 + (33 * 5 if x_grad else 0), saved  # T in fp32, then the bits [33, ceil(40/8)]
    x, params = make_inputs("tl6", M=33, K=40, N=24, R=4, dtype=torch.bfloat16)
    x.requires_grad_(x_grad)
    nbytes, saved = saved_activation_bytes(x, params, dropout=0.3)
    assert nbytes == 4 * 33 * 4 + 33 * 40 * 2 + 33 * 5, saved  # T, x (bf16) and the bits


@pytest.mark.parametrize("config", ["lora", "tl6", "full"])
def test_frozen_input_with_a_trained_a(config):
    """The first adapted layer of a frozen model (x needs no gradient) with A trained: dA still reads the mask
    (``m ⊙ x``, scaled by ``1/(1-p)``), kept for it alone, where no dx kernel asks for it."""
    x, params = make_inputs(config, M=37, K=40, N=24, R=4, dtype=torch.float32, bias=config != "lora")
    check_dropout_parity(x.detach(), params, 0.3)


def test_no_grad_forward_keeps_no_mask(monkeypatch):
    from tied_lora_kernels.kernels import function

    masks = []

    def spy(*args, **kwargs):
        masks.append(new_mask(*args, **kwargs))
        return masks[-1]

    monkeypatch.setattr(function, "new_mask", spy)
    x, params = make_inputs("tl6", M=20, K=48, N=32, R=4, dtype=torch.float32)
    args = [params[k] for k in ARGS]
    with torch.no_grad():
        tied_lora_linear(x, *args, 0.5, backend="triton", dropout=0.5)
    tied_lora_linear(x, *args, 0.5, backend="triton", dropout=0.5)
    assert [m.bits is None for m in masks] == [True, False]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_redraws_the_same_mask(use_reentrant):
    """``torch.utils.checkpoint`` restores the generator before recomputing: the same mask, the same gradients."""
    x, params = make_inputs("tl6", M=24, K=40, N=32, R=4, dtype=torch.float32)
    args = [params[k] for k in ARGS]
    inputs = {"x": x, **params}
    dy = torch.randn(24, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def run(x_):
        return tied_lora_linear(x_, *args, 0.5, backend="triton", dropout=0.4)

    def grads(y):  # .backward(): reentrant checkpointing refuses torch.autograd.grad
        y.backward(dy)
        out = {k: t.grad.clone() for k, t in inputs.items() if t is not None and t.requires_grad}
        for t in inputs.values():
            if t is not None:
                t.grad = None
        return out

    torch.manual_seed(9)
    plain = grads(run(x))
    torch.manual_seed(9)
    checkpointed = grads(torch.utils.checkpoint.checkpoint(run, x, use_reentrant=use_reentrant))
    assert plain.keys() == {"x", "A", "B", "u", "v"}
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name
