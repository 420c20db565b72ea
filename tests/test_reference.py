"""The specification itself: the forward, the delta weight and docs/design.md §4's backward identities agree."""

import pytest
import torch

from tied_lora_kernels import reference


def _problem(M=7, K=11, N=13, R=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {
        name: torch.randn(shape, generator=g, dtype=torch.float64)
        for name, shape in {"x": (M, K), "W": (N, K), "b": (N,), "A": (R, K), "B": (N, R), "u": (R,), "v": (N,)}.items()
    }
    return t


def test_forward_equals_base_plus_delta_weight():
    p = _problem()
    y = reference.tied_lora_forward(p["x"], p["W"], p["b"], p["A"], p["B"], p["u"], p["v"], 0.7)
    delta = reference.delta_weight(p["A"], p["B"], p["u"], p["v"], 0.7)
    torch.testing.assert_close(y, p["x"] @ (p["W"] + delta).t() + p["b"], rtol=1e-13, atol=1e-13)


def test_delta_weight_is_the_paper_formula():
    p = _problem()
    delta = reference.delta_weight(p["A"], p["B"], p["u"], p["v"], 2.0)
    expected = 2.0 * torch.diag(p["v"]) @ p["B"] @ torch.diag(p["u"]) @ p["A"]
    torch.testing.assert_close(delta, expected, rtol=1e-13, atol=1e-13)


def test_none_means_ones():
    p = _problem()
    ones_u, ones_v = torch.ones_like(p["u"]), torch.ones_like(p["v"])
    a = reference.tied_lora_forward(p["x"], p["W"], None, p["A"], p["B"], None, None, 1.5)
    b = reference.tied_lora_forward(p["x"], p["W"], None, p["A"], p["B"], ones_u, ones_v, 1.5)
    assert torch.equal(a, b)


def test_upcast_gives_float64_from_any_dtype():
    p = {k: v.float() for k, v in _problem().items()}
    y = reference.tied_lora_forward(p["x"], p["W"], p["b"], p["A"], p["B"], p["u"], p["v"], upcast=True)
    assert y.dtype == torch.float64
    y32 = reference.tied_lora_forward(p["x"], p["W"], p["b"], p["A"], p["B"], p["u"], p["v"])
    assert y32.dtype == torch.float32


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_backward_identities_match_autograd(scale):
    """docs/design.md §4: G = dyᵀS, dB = s·v⊙G, dv = s·rowsum(B⊙G), dS = s·dy(v⊙B), du = colsum(dS⊙T),
    dT = dS⊙u, dA = dTᵀx, dx = dyW + dTA, db = colsum(dy) — to 1e-13 in float64."""
    p = {k: v.requires_grad_() for k, v in _problem(M=9, K=10, N=12, R=4).items()}
    y = reference.tied_lora_forward(p["x"], p["W"], p["b"], p["A"], p["B"], p["u"], p["v"], scale)
    dy = torch.randn_like(y)
    y.backward(dy)
    with torch.no_grad():
        x, W, A, B, u, v = (p[k] for k in ("x", "W", "A", "B", "u", "v"))
        T = x @ A.t()
        S = u * T
        G = dy.t() @ S
        dS = scale * dy @ (v[:, None] * B)
        dT = dS * u
        expected = {
            "B": scale * v[:, None] * G,
            "v": scale * (B * G).sum(1),
            "u": (dS * T).sum(0),
            "A": dT.t() @ x,
            "x": dy @ W + dT @ A,
            "b": dy.sum(0),
            "W": dy.t() @ x,
        }
    for name, want in expected.items():
        torch.testing.assert_close(p[name].grad, want, rtol=1e-13, atol=1e-13, msg=f"d{name}")


def test_dropout_keep_keeps_a_draw_equal_to_the_threshold():
    """An entry is kept when its 31-bit draw is *at least* round(p · 2³¹): a draw exactly at the threshold stays."""
    zero = torch.zeros(1, dtype=torch.int64)
    draw = int(reference._philox4x32_10(zero, zero, zero, zero, 7)[0].item()) >> 1
    p = draw / 2**31
    assert round(p * 2**31) == draw
    assert reference.dropout_keep(7, 1, 1, p)[0, 0]
    assert not reference.dropout_keep(7, 1, 1, (draw + 1) / 2**31)[0, 0]
