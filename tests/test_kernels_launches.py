"""How many kernels one call of the triton path launches: counted, not timed (style.md: speed lives in the
benchmarks), because on a GPU each small launch costs a few microseconds whatever it computes — as much as
the whole rank-R path at a few thousand tokens — and the host's time per launch adds up the same way.

Counted: every triton launch and every torch operator that would launch a CUDA kernel (views and
allocations excluded). The structure these numbers pin down (backward.py, prepare.py):

- prefill forward: ``A`` cast and ``s·v ⊙ B`` folded in one launch, then the fused GEMM (two-pass: the
  shrink first); decode forward: the fused GEMM alone, plus, with K split, the sum of y's slices, which also
  sums T's (``forcing.split_rank`` "apart", the default); with "in_tile" T's slices are summed by a launch
  of their own, and when the kernel sums y's (in-tile) that launch is the only one after it;
- backward: ``s·v ⊙ B`` (one launch), the dx GEMM (writing ``dS`` only when ``A`` trains), ``dA``'s reduction,
  and one pass over ``dy`` whose epilogue writes ``dB``, ``dv`` and ``du`` — both reductions adding into one
  zeroed buffer (atomics), or each with one sum of its partials (deterministic).
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import timing
from tests.test_kernels_parity import make_inputs
from tied_lora_kernels.functional import tied_lora_linear
from tied_lora_kernels.kernels import forcing

# operators that launch nothing: views, metadata, allocation
_FREE = {
    "empty", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view", "as_strided", "t",
    "transpose", "permute", "slice", "select", "unsqueeze", "squeeze", "expand", "alias", "detach", "split",
    "split_with_sizes", "lift_fresh", "resolve_conj", "resolve_neg", "_reshape_alias",
}  # fmt: skip


class _Launches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.in_triton = False  # the interpreter runs torch operators of its own inside a launch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _FREE and not self.in_triton:
            self.counts[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_launches():
    """Counter of the kernels launched in the block (``triton.<kernel>`` and ``aten.<op>``)."""
    mode = _Launches()

    def counted(kernel, grid, kwargs, launch):
        mode.counts[f"triton.{timing.kernel_name(kernel)}"] += 1
        mode.in_triton = True
        try:
            return launch()
        finally:
            mode.in_triton = False

    with timing.launches_through(counted), mode:
        yield mode.counts


def _launches(
    preset, M, *, x_grad=True, deterministic=False, strategy=None, split_k=None, reduce=None, split_rank=None,
    dropout=0.0,
):  # fmt: skip
    x, params = make_inputs(preset, M=M, K=320, N=96, R=12, dtype=torch.bfloat16)
    x.requires_grad_(x_grad)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    with forcing.forced(strategy=strategy, split_k=split_k, reduce=reduce, split_rank=split_rank):
        # once before counting: the in-kernel split-K sum zeroes its stream's arrival counts at its first launch
        warm = tied_lora_linear(x, *args, backend="triton", deterministic=deterministic, dropout=dropout)
        warm.backward(torch.ones_like(warm))
        for t in (x, *args):
            if t is not None:
                t.grad = None  # (accumulating into a gradient would add a launch)
        with count_launches() as forward:
            y = tied_lora_linear(x, *args, backend="triton", deterministic=deterministic, dropout=dropout)
        dy = torch.randn_like(y)
        with count_launches() as backward:
            y.backward(dy)
    return forward, backward


# (preset, M, options) -> (forward launches, backward launches)
CASES = {
    ("tl6", 40, ()): (2, 5),  # prepare + GEMM; prepare + dx + one zeroing + the reductions for dA and dB/dv/du
    ("tl6", 40, ("deterministic",)): (2, 7),  # the zeroing becomes a sum of partials per reduction, plus du's
    ("tl6", 40, ("two_pass",)): (3, 6),  # + the shrink of x, and of dy for dx
    ("tl6", 4, ()): (1, 5),  # decode: the GEMM reads the fp32 masters (no prepare); K too short to split
    ("tl6", 4, ("split_k=3",)): (2, 6),  # + one sum of the K slices of y and T, adding y's rank term (dx: dx and dS)
    ("tl6", 4, ("split_k=3", "in_tile")): (3, 7),  # + the sums of the K slices of y and of T (dx: of dx and dS)
    ("tl6", 4, ("split_k=3", "reduce=kernel")): (2, 6),  # y and dx summed by their GEMM's last slices (in-tile)
    ("vera", 40, ()): (2, 4),  # frozen A and B: dx writes no dS, no dA reduction
    ("vera", 40, ("no_x_grad",)): (2, 2),  # and no dx: du from dy's pass alone, no shrink of dy
    ("lora", 40, ()): (2, 5),
    # adapter dropout: the seed's draw, then two-pass (the shrink draws the mask); the backward reads its bits
    ("tl6", 40, ("dropout",)): (4, 6),
    ("tl6", 4, ("dropout",)): (4, 6),  # decode: two-pass casts the fp32 master A for the shrink (and dx: 6 too)
    ("vera", 40, ("dropout", "no_x_grad")): (4, 2),
}


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: "-".join(map(str, (c[0], c[1], *c[2]))))
def test_launches_per_call(case):
    preset, M, options = case
    forward, backward = _launches(
        preset,
        M,
        x_grad="no_x_grad" not in options,
        deterministic="deterministic" in options,
        strategy="two_pass" if "two_pass" in options else None,
        split_k=3 if "split_k=3" in options else None,
        reduce="kernel" if "reduce=kernel" in options else None,
        split_rank="in_tile" if "in_tile" in options else None,
        dropout=0.25 if "dropout" in options else 0.0,
    )
    want_forward, want_backward = CASES[case]
    assert sum(forward.values()) == want_forward, dict(forward)
    assert sum(backward.values()) == want_backward, dict(backward)


@pytest.mark.parametrize("setting", [False, True], ids=["torch-default", "torch-deterministic"])
def test_deterministic_none_follows_torch(setting):
    # deterministic=None (tied_lora_linear's default) is torch.are_deterministic_algorithms_enabled(): TL6 prefill's
    # backward reduces with atomics (5 launches) or per-program partials and their sums (7), as CASES counts them
    before, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(setting)
    try:
        forward, backward = _launches("tl6", 40, deterministic=None)
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
    assert (sum(forward.values()), sum(backward.values())) == CASES[("tl6", 40, ("deterministic",) if setting else ())]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_a_tensor_subclass_comes_back_as_it_does_from_the_torch_path(grad):
    # (as F.linear returns it: the triton path's outputs are made by new_empty, which keeps x's subclass)
    class Sub(torch.Tensor):
        pass

    x, params = make_inputs("tl6", M=3, K=40, N=24, R=4, dtype=torch.float32)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    with torch.set_grad_enabled(grad):
        outs = [tied_lora_linear(x.detach().as_subclass(Sub), *args, backend=b) for b in ("torch", "triton")]
    assert [type(y) for y in outs] == [Sub, Sub]
    torch.testing.assert_close(outs[1].as_subclass(torch.Tensor), outs[0].as_subclass(torch.Tensor))
