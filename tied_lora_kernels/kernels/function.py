"""The autograd Function joining the fused kernels, and ``tied_lora_linear_triton`` (the triton backend)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import configs, forcing
from .backward import rank_grad, rank_grad_numel
from .dropout import DropoutMask, draw_seed, new_mask
from .forward import fused_lora_mm
from .prepare import prepare_adapters
from .shrink import shrink

__all__ = ["TiedLoRALinearFunction", "tied_lora_linear_triton", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tied_lora_linear_triton(
    x2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    u: Tensor | None,
    v: Tensor | None,
    scale: float,
    *,
    deterministic: bool,
    dropout: float = 0.0,
) -> Tensor:
    """``y [M, N] = x Wᵀ + b + scale · (v ⊙ ((u ⊙ (x Aᵀ)) Bᵀ))`` with the fused kernels (inputs pre-checked;
    ``dropout`` in [0, 1): adapter dropout drawn in the kernels, ``dropout.py``).

    Shapes as in ``functional.tied_lora_linear`` with ``x2d [M, K]``. Adds the checks only triton needs:
    the input dtype and the largest supported rank.
    """
    if x2d.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"backend='triton' supports float16, bfloat16 and float32 inputs, got {x2d.dtype}; "
            "use backend='torch' for other dtypes"
        )
    configs.check_supported_rank(A.shape[0])
    dropout = float(dropout)
    if torch.compiler.is_compiling():  # torch.compile: the custom op (dynamo cannot trace the launchers)
        return _compiled_forward(x2d, weight, bias, A, B, u, v, float(scale), bool(deterministic), dropout)
    _check_no_transform(x2d, weight, bias, A, B, u, v)
    if not torch.is_grad_enabled():
        # no backward can follow (inference, generate): the kernels alone, without an autograd node, which
        # costs as much host time as the whole launch path of a decode step
        strategy, split_k, tma = forcing.forced_choice()
        y, _, _ = forward_impl(
            x2d, weight, bias, A, B, u, v, float(scale), keep_t=False, dropout=dropout, keep_mask=False,
            strategy=strategy, split_k=split_k, tma=tma,
        )  # fmt: skip
        return y
    return TiedLoRALinearFunction.apply(x2d, weight, bias, A, B, u, v, float(scale), bool(deterministic), dropout)


def _check_no_transform(*tensors: Tensor | None) -> None:
    """The kernels read raw storage: refuse ``torch.func`` transforms (their wrapped tensors) and forward-mode AD
    (a tangent would be dropped), naming the backend that supports them."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(
            "backend='triton' does not run under torch.func transforms (vmap, grad, jacrev, jvp, ...); "
            "use backend='torch'"
        )
    if torch.autograd.forward_ad._current_level >= 0:  # inside fwAD.dual_level(): look for a tangent
        if any(t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors):
            raise RuntimeError("backend='triton' has no forward-mode AD (an input has a tangent); use backend='torch'")


def _read_by_backward(needs: tuple[bool, ...], weight: Tensor, A: Tensor, B: Tensor, u, v) -> tuple:
    """``(W, A, B, u, v)`` as the backward reads them, else None (``needs``: ``needs_input_grad`` of x, W, b, A, B,
    u, v): W only for dx, A only for dx and dA, B, u and v for dx and any adapter gradient (none when only W or b
    trains). Frozen tensors it does not read are not saved, as the torch path does not save them: an
    inference-mode tensor, or one updated in place before the backward, stays usable. Those it reads are saved
    detached (the same storage and version counter, so an in-place change before the backward is still caught):
    torch 2.8 skipped the tensor hooks (``register_hook``) of a tied ``A`` or ``B`` saved as the leaf itself by the
    layers of two non-reentrant checkpointed regions (its later versions fire them; the torch path's did)."""
    needs_x, _, _, needs_a, needs_b, needs_u, needs_v = needs[:7]
    adapter = needs_x or needs_a or needs_b or needs_u or needs_v
    return (
        weight.detach() if needs_x else None,
        A.detach() if needs_x or needs_a else None,
        *(t.detach() if adapter and t is not None else None for t in (B, u, v)),
    )


def _on_device(t: Tensor):
    """Launch on ``t``'s GPU and its current stream, whatever the current device (triton uses the latter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _resolved(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors with their negative bit (a lazy negation, as in ``z.conj().imag``) applied: the kernels read raw
    storage, which holds the negated values. A tensor without the bit is itself, found by ``is_neg`` (a flag read)
    rather than ``resolve_neg`` (a dispatched op, ~0.2 µs each, seven per decode call)."""
    return tuple(t.resolve_neg() if t is not None and t.is_neg() else t for t in tensors)


def _f32(t: Tensor | None) -> Tensor | None:
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):  # (fp32 masters: a microsecond less)
        return t
    return t.to(torch.float32).contiguous()


def _times(u: Tensor | None, s: float, R: int, device: torch.device) -> Tensor | None:
    """``s·u`` ``[R]`` in fp32 (``u`` None: ones), None where that is ones."""
    if s == 1.0:
        return u
    return u * s if u is not None else torch.full((R,), s, device=device, dtype=torch.float32)


def _as(grad: Tensor | None, param: Tensor | None) -> Tensor | None:
    """An fp32 gradient in its parameter's dtype (no copy for fp32 masters)."""
    return None if grad is None or param is None else grad.to(param.dtype)


def forward_impl(
    x, weight, bias, A, B, u, v, scale, *, keep_t, strategy, split_k, tma, dropout=0.0, seed=None, keep_mask=True
):
    """``(y [M, N], T [M, R] fp32 or None, dropout bits or None)``: the forward of ``TiedLoRALinearFunction`` (and
    of the custom op). With ``dropout > 0`` the shrink draws a keep mask from ``seed`` (None: a new one) and
    returns it as bits when ``keep_mask`` (for a backward that computes dx or dA)."""
    x, weight, bias, A, B, u, v = _resolved(x, weight, bias, A, B, u, v)
    dtype = x.dtype
    drop = new_mask(dropout, *x.shape, x.device, seed, keep=keep_mask) if dropout else None
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias with unit stride
    # y = x·Wᵀ + ((x·Aᵀ) ⊙ u)·(Bᵀ ⊙ s·v) + b, T = x·Aᵀ in fp32. At decode the kernel reads the master A and B
    # and folds s·v itself (a launch fewer, which costs as much as the GEMM there); prefill has A cast and
    # s·v ⊙ B folded by one launch (prepare.py), amortised over a long GEMM
    with _on_device(x):
        if configs.regime_of(x.shape[0]) == "decode":  # adapters are fp32 or x's dtype (functional.py)
            down, up, fold = A.t(), B.t(), dict(scale=scale, cscale=_f32(v))
        else:
            A_cast, svB = prepare_adapters(A, B, v, scale, dtype, cast_a=True)
            # (contiguous: a TMA descriptor of A then has rows of K elements, never a column-major A's R
            # columns followed by padding whose contents are unknown; prepare.py)
            down, up, fold = A_cast.contiguous().t(), svB.t(), {}
        y, T = fused_lora_mm(
            x, weight.t(), down, up, _f32(u), bias, **fold, write_t=keep_t, strategy=strategy, split_k=split_k, tma=tma,
            drop_a=drop,
        )  # fmt: skip
    return y, T, (drop.bits if drop is not None else None)  # (None unless keep_mask)


def backward_impl(
    dy, x, T, weight, A, B, u, v, scale, needs, *, deterministic, strategy, split_k, tma, bits=None, dropout=0.0
):
    """``(dx, dW, db, dA, dB, du, dv)`` (None where ``needs``, seven bools in that order, is False): the
    backward of ``TiedLoRALinearFunction`` (and of the custom op). ``x`` may be None unless A or W trains,
    ``T`` unless B, u or v trains; ``bits``: the forward's dropout mask (with its ``dropout``), else None."""
    needs_x, needs_w, needs_bias, needs_a, needs_b, needs_u, needs_v = needs
    # (saved tensors come back as a saved-tensor hook gives them: a negated view, another layout)
    dy, x, T, weight, A, B, u, v = _resolved(dy, x, T, weight, A, B, u, v)
    s, det, dtype = scale, deterministic, dy.dtype
    forced = dict(strategy=strategy, split_k=split_k, tma=tma)
    dx = dw = dbias = dA = dB = du = dv = None
    u32 = _f32(u)
    if bits is not None and bits.shape[1] > 1 and bits.stride(1) != 1:  # the kernels read a row's bytes unit-strided
        bits = bits.contiguous()
    drop = DropoutMask(dropout, None, bits) if bits is not None else None  # (the seed drew it: not needed again)

    with _on_device(dy):
        dyvB = None  # dy·(v ⊙ B) [M, R] fp32: dS = s·dyvB, s applied in fp32 (dx's rscale, dA's scale)
        if needs_x or needs_a:
            # v ⊙ B [N, R] in dy's dtype, without s: folded in, a small s·v ⊙ B (s = 1/128 beside a VeRA v near its
            # zero start) fell below fp16's normal range, and dA lost digits the torch path keeps (its addmm applies
            # s in fp32)
            _, vB = prepare_adapters(A, B, v, 1.0, dtype, cast_a=False)
            if needs_x:
                # dx = dy·W + (dyvB ⊙ s·u)·A, and dyvB in fp32 from the same kernel
                su = _times(u32, s, A.shape[0], dy.device)
                dx, dyvB = fused_lora_mm(dy, weight, vB, A, su, None, write_t=needs_a, **forced, drop_update=drop)
            else:
                dyvB = shrink(dy, vB)  # dx not needed
        g_results = dict(write_out=needs_b, rowdot=needs_v, coldot=needs_u)  # what the pass over dy writes
        ws_a = ws_g = None
        if needs_a and (needs_b or needs_u or needs_v) and not det:
            # with atomics the two reductions add into segments of one buffer: one zeroing, not two
            (R, K), N = A.shape, dy.shape[1]
            sizes = [rank_grad_numel(K, R), rank_grad_numel(N, R, **g_results)]
            ws_a, ws_g = torch.zeros(sum(sizes), device=dy.device, dtype=torch.float32).split_with_sizes(sizes)
        if needs_a:
            # dA = (dS ⊙ u)ᵀ x = s · (dyvB ⊙ u)ᵀ x   [R, K], fp32 (with dropout: s·c · (dyvB ⊙ u)ᵀ (m ⊙ x))
            c = s * (drop.scale if drop is not None else 1.0)
            dA = rank_grad(x, dyvB, u32, deterministic=det, transpose_out=True, scale=c, workspace=ws_a, dropout=drop)
            dA = _as(dA.out, A)
        if needs_b or needs_u or needs_v:
            # one pass over dy: G = dyᵀ (T ⊙ u) [N, R] in fp32, never stored; its epilogue writes dB = s·v ⊙ G,
            # dv = s·rowsum(B ⊙ G) and du = colsum(dS ⊙ T) = colsum((s·v ⊙ B) ⊙ dyᵀT) (backward.py)
            dB, dv, du = rank_grad(
                dy, T, u32, deterministic=det, scale=s, ovec=_f32(v), rowmat=B, **g_results, workspace=ws_g
            )
            dB, dv, du = _as(dB, B), _as(dv, v), _as(du, u)
        if needs_w:
            dw = dy.t().mm(x)  # dW = dyᵀ x   [N, K]
        if needs_bias:
            dbias = dy.sum(0)  # db = colsum(dy)   [N]
    return dx, dw, dbias, dA, dB, du, dv


class TiedLoRALinearFunction(torch.autograd.Function):
    """Tied-LoRA linear on ``x [M, K]`` with the fused Triton kernels (docs/design.md §3-§4).

    Forward, with ``T = x Aᵀ [M, R]`` and ``S = u ⊙ T`` (``u``, ``v`` = ones when None)::

        y  = x Wᵀ + b + s · (S Bᵀ) ⊙ v                        [M, N]   the fused GEMM; saves T (fp32)

    Backward, given ``dy [M, N]``::

        dS = s · dy (v ⊙ B)              [M, R]   fp32, written by the dx kernel (two-pass: by the shrink) as
                                                  dy (v ⊙ B), s applied in fp32 (dx's rscale s·u, dA's scale)
        dT = dS ⊙ u                      [M, R]
        dx = dy W + dT A                 [M, K]   the forward kernel again
        G  = dyᵀ S                       [N, R]   one pass over dy (rank_grad), never stored: its
        dB = s · v[:, None] ⊙ G          [N, R]     epilogue writes dB,
        dv = s · rowsum(B ⊙ G)           [N]        dv
        du = colsum(dS ⊙ T)              [R]        and du, as colsum((s·v ⊙ B) ⊙ dyᵀT)
        dA = dTᵀ x                       [R, K]   (rank_grad)
        dW = dyᵀ x                       [N, K]   (torch matmul, only if W trains)
        db = colsum(dy)                  [N]      (only if b trains)

    The fused GEMM is one-pass (``T`` accumulated in its K loop) or two-pass (``T``, resp. ``dS``, written
    first by the shrink kernel), chosen per shape by ``configs.strategy_for``; at decode it may split K.

    Saved for backward: ``T`` in fp32 only when ``B``, ``u`` or ``v`` trains, ``x`` only when ``A`` or ``W``
    trains; the parameters themselves (no casts or copies of them: ``W`` only for dx, ``A`` only for dx and dA,
    ``B``, ``u``, ``v`` for dx and the adapter's gradients, as the torch path's ops save what their backward
    reads); with adapter dropout the keep mask as bits (``M·K/8`` bytes; ``dropout.py`` has the math). Work for a
    frozen input is skipped.
    ``dA``, ``dB``, ``du``, ``dv`` are fp32 per-layer partials returned in the parameter's dtype: with float32
    master adapters autograd sums the partials of tied layers in fp32, in place, and fires each hook once.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, u, v, scale, deterministic, dropout):
        needs_x, needs_w, _, needs_a, needs_b, needs_u, needs_v = ctx.needs_input_grad[:7]
        # a forced strategy / split / load (forcing.forced, TIED_LORA_STRATEGY, TIED_LORA_TMA) holds for the
        # backward too
        strategy, split_k, tma = forcing.forced_choice()
        # (applied with grad enabled only: tied_lora_linear_triton runs the kernels alone under no_grad)
        keep_t = needs_b or needs_u or needs_v
        forced = dict(strategy=strategy, split_k=split_k, tma=tma)
        keep_mask = needs_x or needs_a  # the mask's readers: dx and dA
        y, T, bits = forward_impl(
            x, weight, bias, A, B, u, v, scale, keep_t=keep_t, dropout=dropout, keep_mask=keep_mask, **forced
        )
        read = _read_by_backward(ctx.needs_input_grad, weight, A, B, u, v)
        ctx.save_for_backward(x if (needs_a or needs_w) else None, T, *read, bits)
        ctx.scale = scale
        ctx.dropout = dropout
        ctx.deterministic = deterministic
        ctx.forced = forced
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: the gradients would have to be differentiable
            # (once_differentiable raises only when dy requires grad: dx's dependence on A, B, u, v was
            # silently dropped, e.g. in an input-gradient penalty)
            raise RuntimeError(
                "backend='triton' computes first-order gradients only; with create_graph=True (double backward: "
                "gradient penalties, Hessian-vector products) use backend='torch'"
            )
        if torch._C._functorch.is_legacy_batchedtensor(dy) or torch._C._functorch.is_batchedtensor(dy):
            # (torch.autograd.grad(..., is_grads_batched=True), jacobian/hessian(vectorize=True): vmap over the
            # backward; the kernels read raw storage, which a batched gradient has not)
            raise RuntimeError(
                "backend='triton' has no batched backward (is_grads_batched=True, vectorize=True); "
                "use backend='torch', or loop over the gradients"
            )
        x, T, weight, A, B, u, v, bits = ctx.saved_tensors
        grads = backward_impl(
            dy, x, T, weight, A, B, u, v, ctx.scale, ctx.needs_input_grad[:7], deterministic=ctx.deterministic,
            **ctx.forced, bits=bits, dropout=ctx.dropout,
        )  # fmt: skip
        # x, weight, bias, A, B, u, v, then None for scale, deterministic and dropout
        return *grads, None, None, None


# ---------------------------------------------------------------------------------------------------------
# the same forward and backward as torch.library custom ops: what torch.compile sees
#
# Dynamo cannot trace the launchers (host-side views, ``out=`` ops, config tables, triton's launch), so under
# ``torch.compile`` the fused forward and backward run as two opaque custom ops with fake (shape-only)
# implementations for tracing and the autograd formula of ``TiedLoRALinearFunction``. Eager calls keep the
# plain Function: a custom op's dispatch costs ~40 µs more per call on the host (2 CPU cores, torch 2.13),
# as long as a decode GEMM. Optional results travel as empty tensors (a custom op returns tensors only);
# a forced choice (strategy, split, loads) is read once, when the graph is traced.


def _compiled_forward(x, weight, bias, A, B, u, v, scale, deterministic, dropout):
    strategy, split_k, tma = forcing.forced_choice()
    grad = torch.is_grad_enabled()
    keep_t = grad and any(t is not None and t.requires_grad for t in (B, u, v))
    save_x = grad and (A.requires_grad or weight.requires_grad)
    forced = (strategy, split_k, tma)
    seed = draw_seed(x.device) if dropout else None  # traced into the graph: see dropout.py
    y, _, _ = _forward_op(x, weight, bias, A, B, u, v, scale, deterministic, dropout, seed, keep_t, save_x, *forced)
    return y


@torch.library.custom_op("tied_lora_kernels::forward", mutates_args=())
def _forward_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],  # noqa: UP045 (custom_op reads the annotations)
    A: Tensor,
    B: Tensor,
    u: Optional[Tensor],  # noqa: UP045
    v: Optional[Tensor],  # noqa: UP045
    scale: float,
    deterministic: bool,
    dropout: float,
    seed: Optional[Tensor],  # noqa: UP045
    keep_t: bool,
    save_x: bool,
    strategy: Optional[str],  # noqa: UP045
    split_k: Optional[int],  # noqa: UP045
    tma: Optional[bool],  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, T, bits)``, ``T`` empty unless ``keep_t``, ``bits`` (the dropout mask, drawn from ``seed``) unless
    ``dropout`` (``deterministic``, ``save_x``: for the backward)."""
    forced = dict(strategy=strategy, split_k=split_k, tma=tma)
    y, T, bits = forward_impl(x, weight, bias, A, B, u, v, scale, keep_t=keep_t, dropout=dropout, seed=seed, **forced)
    empty = x.new_empty(0, dtype=torch.float32)
    return y, (T if T is not None else empty), (bits if bits is not None else empty.to(torch.uint8))


@_forward_op.register_fake
def _(x, weight, bias, A, B, u, v, scale, deterministic, dropout, seed, keep_t, save_x, strategy, split_k, tma):
    T = x.new_empty((x.shape[0], A.shape[0]) if keep_t else (0,), dtype=torch.float32)
    bits = x.new_empty((x.shape[0], (x.shape[1] + 7) // 8) if dropout else (0,), dtype=torch.uint8)
    return x.new_empty(x.shape[0], weight.shape[0]), T, bits


def _setup_forward(ctx, inputs, output):
    x, weight, bias, A, B, u, v, scale, deterministic, dropout, seed, keep_t, save_x, *forced = inputs
    _, T, bits = output
    ctx.mark_non_differentiable(T, bits)
    read = _read_by_backward(ctx.needs_input_grad, weight, A, B, u, v)
    ctx.save_for_backward(x if save_x else None, T if keep_t else None, *read, bits if dropout else None)
    ctx.args = (scale, deterministic, dropout, *forced)


def _backward_of_forward_op(ctx, dy, _dT, _dbits):
    x, T, weight, A, B, u, v, bits = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:7])
    grads = _backward_op(dy, x, T, weight, A, B, u, v, bits, needs, *ctx.args)
    # x, weight, bias, A, B, u, v, then None for the nine other arguments (the seed's included)
    return *(g if need else None for g, need in zip(grads, needs, strict=True)), *(None,) * 9


_forward_op.register_autograd(_backward_of_forward_op, setup_context=_setup_forward)


@torch.library.custom_op("tied_lora_kernels::backward", mutates_args=())
def _backward_op(
    dy: Tensor,
    x: Optional[Tensor],  # noqa: UP045
    T: Optional[Tensor],  # noqa: UP045
    weight: Optional[Tensor],  # noqa: UP045
    A: Optional[Tensor],  # noqa: UP045
    B: Optional[Tensor],  # noqa: UP045
    u: Optional[Tensor],  # noqa: UP045
    v: Optional[Tensor],  # noqa: UP045
    bits: Optional[Tensor],  # noqa: UP045
    needs: list[bool],
    scale: float,
    deterministic: bool,
    dropout: float,
    strategy: Optional[str],  # noqa: UP045
    split_k: Optional[int],  # noqa: UP045
    tma: Optional[bool],  # noqa: UP045
) -> list[Tensor]:
    """``[dx, dW, db, dA, dB, du, dv]``, each empty where ``needs`` is False."""
    forced = dict(strategy=strategy, split_k=split_k, tma=tma)
    grads = backward_impl(
        dy, x, T, weight, A, B, u, v, scale, needs, deterministic=deterministic, **forced, bits=bits, dropout=dropout
    )
    # a custom op's outputs may not alias each other: dB, dv and du are segments of one buffer (rank_grad),
    # and so is dA with atomics (backward_impl), so all but the first of those get their own copy (a few kilobytes)
    out, storages = [], set()
    for g in grads:
        if g is None:
            g = dy.new_empty(0)
        elif g.untyped_storage().data_ptr() in storages:
            g = g.clone()
        storages.add(g.untyped_storage().data_ptr())
        out.append(g)
    return out


@_backward_op.register_fake
def _(dy, x, T, weight, A, B, u, v, bits, needs, scale, deterministic, dropout, strategy, split_k, tma):
    # (weight is saved for dx only, A for dx and dA, x for dA and dW: K from whichever a needed gradient has; B, u
    # and v for dx and the adapter's gradients, where B gives R)
    (M, N), R = dy.shape, (B.shape[1] if B is not None else 0)
    K = next((t.shape[1] for t in (weight, A, x) if t is not None), 0)
    b_dtype = B.dtype if B is not None else dy.dtype  # (unused: no adapter gradient is needed without B)
    a_dtype = A.dtype if A is not None else b_dtype  # (the adapters' dtype, for dA when A is saved)
    shapes = ((M, K, dy.dtype), (N, K, dy.dtype), (N, dy.dtype), (R, K, a_dtype), (N, R, b_dtype))
    shapes += ((R, u.dtype if u is not None else b_dtype), (N, v.dtype if v is not None else b_dtype))
    return [
        dy.new_empty(s[:-1], dtype=s[-1]) if need else dy.new_empty(0) for s, need in zip(shapes, needs, strict=True)
    ]
