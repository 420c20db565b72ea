"""CUDA graphs over the fused kernels (GPU only): a split-K decode captured by hand and under
``torch.compile(mode="reduce-overhead")``, and a training step with adapter dropout captured by hand, compute
what eager computes. Last in gpu_check.sh's parity phase: new on hardware, so a failure here (which stops the
phase's other processes under -x) comes after the rest."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DEVICE
from tests.test_kernels_parity import make_inputs
from tied_lora_kernels.functional import tied_lora_linear
from tied_lora_kernels.kernels import configs, dropout, forcing

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")]


def _decode_layer() -> list:
    """``weight, bias, A, B, u, v`` of a 4096-wide TL6 layer in bf16 (fp32 adapters), as a split-K decode runs."""
    _, params = make_inputs("tl6", M=1, K=4096, N=4096, R=16, dtype=torch.bfloat16)
    return [params[k].detach() if params[k] is not None else None for k in ("weight", "bias", "A", "B", "u", "v")]


@pytest.mark.parametrize("reduce", configs.SPLIT_REDUCES)
def test_cuda_graph_replays_a_split_decode_as_eager_runs_it(reduce):
    """A split-K decode forward captured in a CUDA graph (the decode benchmarks' timing, a user's graphed
    generate) computes at each replay, for the inputs copied in, what an eager launch computes: bit for bit (the
    same kernels). With the in-kernel sum, the capture's own arrival counts are zeroed inside the graph."""
    args = _decode_layer()
    inputs = [torch.randn(1, 4096, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16) for i in range(3)]
    inputs = [x.to(DEVICE) for x in inputs]
    with torch.no_grad(), forcing.forced(reduce=reduce):
        want = [tied_lora_linear(x, *args, backend="triton") for x in inputs]
        x = inputs[0].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture's stream, as torch.cuda.graphs asks
            tied_lora_linear(x, *args, backend="triton")
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = tied_lora_linear(x, *args, backend="triton")
        for i in (1, 2, 0, 1):
            x.copy_(inputs[i])
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, want[i]), (reduce, i)


@pytest.mark.parametrize("reduce", configs.SPLIT_REDUCES)
def test_reduce_overhead_mode_runs_a_split_decode(reduce):
    """``torch.compile(mode="reduce-overhead")`` (CUDA graphs of the compiled graph) over a split-K decode: its
    warm-up, capture and replays run the custom op and give eager's result. The in-kernel sum's shared arrival
    counts are made outside the graph's memory pool (its checks refuse a buffer that outlives the graph)."""
    args = _decode_layer()
    torch._dynamo.reset()
    layer = torch.compile(lambda x: tied_lora_linear(x, *args, backend="triton"), mode="reduce-overhead")
    with torch.no_grad(), forcing.forced(reduce=reduce):
        for i in range(4):
            x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16).to(DEVICE)
            got = layer(x).clone()
            torch.testing.assert_close(got, tied_lora_linear(x, *args, backend="triton"), rtol=0, atol=0)


def test_cuda_graph_training_step_with_dropout_draws_a_new_mask_at_each_replay(monkeypatch):
    """A TL6 training step (forward with adapter dropout, then every gradient by ``torch.autograd.grad``) captured
    in a CUDA graph: the dropout seed is drawn on the device, so each replay draws a new mask (a seed baked into
    the graph would train every step on one mask), and each replay's output and gradients are, bit for bit, what
    an eager step computes from that replay's seed (deterministic reductions: atomics would reorder sums)."""
    x, params = make_inputs("tl6", M=64, K=256, N=192, R=8, dtype=torch.bfloat16)
    args = [params[k] for k in ("weight", "bias", "A", "B", "u", "v")]
    wrt = [x, *(t for t in args if t is not None and t.requires_grad)]
    dy = torch.randn(64, 192, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).to(DEVICE)
    seen = torch.zeros(1, dtype=torch.int64, device=DEVICE)  # each step's seed, copied out by the step itself
    draw = dropout.draw_seed

    def recorded(device):
        seed = draw(device)
        seen.copy_(seed)
        return seed

    def step():
        y = tied_lora_linear(x, *args, scale=0.5, backend="triton", deterministic=True, dropout=0.25)
        return [y, *torch.autograd.grad(y, wrt, dy)]

    monkeypatch.setattr(dropout, "draw_seed", recorded)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture's stream, as torch.cuda.graphs asks
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    replays = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        replays.append((int(seen), [t.clone() for t in static]))
    assert len({seed for seed, _ in replays}) == 3, "a replay reused a dropout seed"
    assert not torch.equal(replays[0][1][0], replays[1][1][0]), "two replays dropped the same entries"
    for seed, got in replays:
        monkeypatch.setattr(dropout, "draw_seed", lambda device, seed=seed: torch.tensor([seed], device=device))
        want = step()
        for name, a, b in zip(["y", *(f"grad {i}" for i in range(len(wrt)))], got, want, strict=True):
            assert torch.equal(a, b), (seed, name)
