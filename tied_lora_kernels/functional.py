"""``tied_lora_linear``: the functional entry point — input checks, backend dispatch and the torch path.

Both backends compute ``y = x Wᵀ + b + scale · (v ⊙ ((u ⊙ (x Aᵀ)) Bᵀ))`` (see ``reference.py``):

- ``"torch"``: plain PyTorch, what CPU users run. No copy of W, no ``[M, N]`` temporary beyond the output:
  the rank-R product is accumulated into the base output in place (``addmm_``), with ``v`` folded into the
  ``[N, R]`` matrix B. Adapters stored in float32 (master weights) are cast to the compute dtype (an
  ``[R, K]`` and an ``[N, R]`` copy); besides them, only small ``[N, R]`` and ``[M, R]`` products and, with
  dropout, ``F.dropout``'s mask and dropped copy of ``x``.
- ``"triton"``: the fused kernels of ``tied_lora_kernels.kernels``.
- ``"auto"``: triton for CUDA tensors the kernels support (an NVIDIA GPU of compute capability ≥ 8.0, triton
  importable, fp16/bf16/fp32, rank ≤ 128, no tensor subclass that dispatches its own ops), torch otherwise.

Adapter dropout (``dropout=p``, PEFT's ``lora_dropout``) drops entries of the adapter's input only — the base
GEMM sees ``x`` as it is. The torch path draws it with ``F.dropout``; the fused kernels draw their own mask
(``kernels/dropout.py``: Philox from a seed on ``x``'s device generator), so the two backends drop with the
same probability but not the same entries.
"""

from __future__ import annotations

import functools
import math
from numbers import Integral, Real

import torch
from torch import Tensor

from tied_lora_kernels import kernels  # imports neither triton nor the kernels until they are used

__all__ = ["tied_lora_linear", "add_adapter", "BACKENDS", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton")


def tied_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    u: Tensor | None = None,
    v: Tensor | None = None,
    scale: float = 1.0,
    *,
    backend: str = "auto",
    deterministic: bool | None = None,
    dropout: float = 0.0,
) -> Tensor:
    """Tied-LoRA linear layer ``x Wᵀ + b + scale · (v ⊙ ((u ⊙ (x Aᵀ)) Bᵀ))`` on any leading dims of ``x``.

    Shapes: ``x [..., K]``, ``weight [N, K]``, ``bias [N]`` or None, ``A [R, K]``, ``B [N, R]``,
    ``u [R]`` or None (ones, frozen), ``v [N]`` or None (ones, frozen). ``weight`` and ``bias`` have
    ``x``'s dtype; each of ``A, B, u, v`` has ``x``'s dtype or float32 (master weights). Gradients flow
    to every input that requires them (the triton path: first-order only; ``create_graph``, ``torch.func`` and
    forward-mode AD raise and name ``backend='torch'``; it takes fp16, bf16 and fp32 at rank ≤ 128, refusing
    others by name). ``deterministic`` (triton only) picks per-program partial sums
    over atomics for the reductions over tokens; ``None`` follows
    ``torch.are_deterministic_algorithms_enabled()``. ``dropout`` (in [0, 1)) zeroes entries of the adapter's
    input with that probability and scales the rest by ``1 / (1 - dropout)``, as ``F.dropout`` does, whatever
    the module's mode: pass 0 for evaluation. Both backends support it (their masks differ; the triton
    forward then runs its two-pass strategy and keeps the mask as bits, ``M·⌈K/8⌉`` bytes, for the backward
    when it computes ``dx`` or ``dA``; under torch.compile whenever the graph trains).
    """
    autocast = _autocast_dtype(x)
    if autocast is not None:
        # Autocast has no rule for a custom op: cast x, W and b as it would for F.linear (floating tensors
        # other than float64 go to the autocast dtype), keep the adapters as they are (float32 masters stay
        # float32), and run with autocast off.
        x, weight, bias = (_autocast(t, autocast) for t in (x, weight, bias))
    _check_inputs(x, weight, bias, A, B, u, v, scale)
    check_dropout(dropout)
    requested, backend = backend, resolve_backend(backend, x, A.shape[0])
    if backend == "triton":  # (also while torch.compile traces: it sees the subclass's type)
        subclass = _dispatching_subclass(x, weight, bias, A, B, u, v)
        if subclass is not None and requested == "triton":
            raise TypeError(
                f"{subclass} (a tensor subclass that dispatches its own ops: DTensor, a float8 or quantized wrapper, "
                "a fake tensor): the fused kernels read a plain tensor's memory. Use backend='torch' or 'auto'"
            )
        if subclass is not None:
            backend = "torch"  # "auto": the torch path's ops dispatch to the subclass
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    elif not (isinstance(deterministic, bool) or _is_numpy_bool(deterministic)):
        raise TypeError(f"deterministic must be True, False or None, got {deterministic!r}")
    deterministic = bool(deterministic)
    if autocast is not None:
        with torch.autocast(x.device.type, enabled=False):
            return _dispatch(backend, x, weight, bias, A, B, u, v, float(scale), deterministic, dropout)
    return _dispatch(backend, x, weight, bias, A, B, u, v, float(scale), deterministic, dropout)


def _dispatching_subclass(*tensors: Tensor | None) -> str | None:
    """``"name is a Class"`` for the first of ``x, weight, bias, A, B, u, v`` whose class dispatches its own ops
    (``__torch_dispatch__``: a wrapper whose memory, if it has any, is not its values), else None. Parameters and
    plain subclasses pass. (Positional: keywords cost as much again, at decode.)"""
    for name, t in zip(_INPUTS, tensors, strict=True):
        # (a fake or functional tensor while torch.export or torch.compile traces stands in for a plain one: the
        # custom op runs on those)
        if _dispatches(t) and not (isinstance(t, _TRACING) and torch.compiler.is_compiling()):
            return f"{name} is a {type(t).__module__}.{type(t).__qualname__}"
    return None


_INPUTS = ("x", "weight", "bias", "A", "B", "u", "v")
_TRACING = (torch._subclasses.fake_tensor.FakeTensor, torch._subclasses.functional_tensor.FunctionalTensor)


def _dispatches(t: Tensor | None) -> bool:
    """Whether ``t``'s class dispatches its own ops (a tensor and a parameter first: a tuple lookup, at decode)."""
    cls = type(t)
    return cls not in _PLAIN and getattr(cls, "__torch_dispatch__", None) is not torch._C._disabled_torch_dispatch_impl


_PLAIN = (Tensor, torch.nn.Parameter, type(None))


def _is_numpy_bool(flag) -> bool:
    return type(flag).__module__ == "numpy" and str(getattr(flag, "dtype", "")) == "bool"


def _autocast_dtype(x) -> torch.dtype | None:
    if not isinstance(x, Tensor) or not _autocast_available(x.device.type):
        return None
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None


@torch.compiler.assume_constant_result  # dynamo cannot trace this builtin on torch 2.11 (fullgraph fails)
def _autocast_available(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type)


def _autocast(t, dtype: torch.dtype):
    eligible = isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
    return t.to(dtype) if eligible else t


def resolve_backend(backend: str, x: Tensor, rank: int = 1) -> str:
    """The backend ``"auto"`` stands for on ``x``, after checking that triton, where requested, can run on
    ``x``'s device (its dtype and the rank are checked by the kernels' entry point).

    ``"auto"`` is triton for CUDA tensors the kernels support (their dtypes, rank ≤ their maximum), torch
    otherwise (also under ``torch.jit.trace``); it never picks triton's CPU interpreter, which is for tests.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if torch.jit.is_tracing():  # (TorchScript records the torch path's ops; the launchers take traced sizes)
        if backend == "triton":
            raise RuntimeError("backend='triton' cannot be traced by torch.jit.trace; use backend='torch' or 'auto'")
        return "torch"
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return "torch"
    reason = _triton_unavailable(x.device)
    if backend == "triton":
        if reason:
            raise RuntimeError(f"backend='triton' cannot run here: {reason}. Use backend='torch' or 'auto'.")
        return "triton"
    if reason:
        return "torch"
    from tied_lora_kernels.kernels import configs
    from tied_lora_kernels.kernels.function import SUPPORTED_DTYPES  # imports triton

    return "triton" if x.dtype in SUPPORTED_DTYPES and rank <= configs.MAX_RANK else "torch"


@torch.compiler.assume_constant_result  # torch.compile: evaluated while tracing, not traced into
def _triton_unavailable(device: torch.device) -> str | None:
    return _cached_reason(device.type, device.index, device.type == "cpu" and kernels.interpreting())


@functools.cache
def _cached_reason(device_type: str, index: int | None, interpreting: bool) -> str | None:
    # ``interpreting`` is part of the key: the answer for CPU tensors depends on it (read for those only)
    return kernels.unavailable_reason(torch.device(device_type) if index is None else torch.device(device_type, index))


def _dispatch(backend, x, weight, bias, A, B, u, v, scale, deterministic, dropout):
    flat = x.dim() == 2  # (a reshape costs as much host time as a check: none for [M, K])
    x2d = x if flat else _rows(x)
    if backend == "triton":
        y2d = kernels.tied_lora_linear_triton(
            x2d, weight, bias, A, B, u, v, scale, deterministic=deterministic, dropout=dropout
        )
    else:
        y2d = _torch_path(x2d, weight, bias, A, B, u, v, scale, dropout)
    return y2d if flat else y2d.reshape(*x.shape[:-1], weight.shape[0])


def _rows(x: Tensor) -> Tensor:
    """``x [..., K]`` as ``[M, K]`` (also for K = 0, where ``reshape(-1, 0)`` cannot infer M)."""
    return x.reshape(-1 if x.shape[-1] else math.prod(x.shape[:-1]), x.shape[-1])


def _torch_path(x2d, weight, bias, A, B, u, v, scale, dropout=0.0):
    y = torch.nn.functional.linear(x2d, weight, bias)  # [M, N]  base, the only [M, N] tensor
    s, b = _rank_factors(x2d, A, B, u, v, dropout)
    # out of place under vmap (a batching rule for addmm, not addmm_) and where any of them dispatches its own ops:
    # an adapter TwoTensor or DTensor beside a plain base output (an in-place op on y cannot hold it), and DTensors
    # throughout (torch 2.8's DTensor has no sharding rule for addmm_, only for addmm)
    subclass = _dispatches(s) or _dispatches(b) or _dispatches(y)
    if subclass or torch._C._functorch.peek_interpreter_stack() is not None:
        return torch.addmm(y, s, b.t(), alpha=scale)
    return y.addmm_(s, b.t(), alpha=scale)  # y += scale · S (v ⊙ B)ᵀ, in place


def _rank_factors(x2d, A, B, u, v, dropout):
    """``S = u ⊙ (x Aᵀ)`` ``[M, R]`` and ``v ⊙ B`` ``[N, R]`` in ``x``'s dtype, so that the adapter term is
    ``scale · S (v ⊙ B)ᵀ`` (``(S Bᵀ) ⊙ v = S (v ⊙ B)ᵀ``); ``dropout`` applies to the adapter's input only."""
    dtype = x2d.dtype
    if dropout:
        x2d = torch.nn.functional.dropout(x2d, dropout)
    s = x2d @ A.to(dtype).t()  # [M, R]  T = x Aᵀ
    if u is not None:
        s = s * u.to(dtype)  # [M, R]  S = u ⊙ T
    b = B.to(dtype)
    if v is not None:
        b = b * v.to(dtype)[:, None]  # [N, R]  v ⊙ B
    return s, b


def add_adapter(y: Tensor, x: Tensor, A, B, u=None, v=None, scale: float = 1.0, *, dropout: float = 0.0) -> Tensor:
    """``y + scale · (v ⊙ ((u ⊙ (x Aᵀ)) Bᵀ))`` (a new tensor, in ``y``'s dtype) on the torch path: the adapter
    beside a base layer the fused kernels cannot read, such as a bitsandbytes quantized linear whose output is
    ``y``. Shapes as in ``tied_lora_linear``, ``y [..., N]`` with ``x``'s leading dims."""
    check_dropout(dropout)
    if not isinstance(y, Tensor) or not isinstance(x, Tensor) or not isinstance(B, Tensor) or B.dim() != 2:
        raise TypeError("add_adapter needs tensors y, x and a 2-D B")
    if not y.is_floating_point():
        raise TypeError(f"y must be a floating-point tensor (the adapter term is added in its dtype), got {y.dtype}")
    K, N = x.shape[-1], B.shape[0]
    # the checks of tied_lora_linear, with a stand-in [N, K] weight (an expanded scalar: no memory)
    _check_inputs(x, x.new_empty(()).expand(N, K), None, A, B, u, v, scale)
    if y.shape != (*x.shape[:-1], N) or y.device != x.device:
        raise ValueError(f"y must be [..., {N}] with x's leading dims on x's device, got {tuple(y.shape)}, {y.device}")
    s, b = _rank_factors(_rows(x), A, B, u, v, dropout)
    return torch.addmm(_rows(y), s.to(y.dtype), b.t().to(y.dtype), alpha=scale).reshape(y.shape)


# ---------------------------------------------------------------------------------------------------------
# input checks: every bad input gets an error that names the problem, before any kernel runs


def _check_inputs(x, weight, bias, A, B, u, v, scale: float) -> None:
    # (on every call, also at decode: one pass over the inputs for what each must be, then the shapes and the
    # dtypes and devices they must share)
    named = (("x", x), ("weight", weight), ("A", A), ("B", B), ("bias", bias), ("u", u), ("v", v))
    for name, t in named:
        if t is None:
            if name in _REQUIRED:
                raise TypeError(f"{name} is required, got None")
        elif not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        elif t.layout != torch.strided or t.is_nested:
            kind = "nested" if t.is_nested else str(t.layout).removeprefix("torch.")
            raise TypeError(f"{name} is a {kind} tensor: tied_lora_linear takes dense (strided) tensors")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if not is_number(scale, Real) or isinstance(scale, Tensor):
        raise TypeError(f"scale must be a finite Python number, got {scale!r}")
    # (under torch.compile(dynamic=True) a float argument is symbolic and cannot be tested while tracing)
    if not torch.compiler.is_compiling() and not abs(scale) <= _FLOAT32_MAX:  # also NaN
        raise ValueError(f"scale must be a finite Python number within float32's range, got {shown(scale)}")

    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x's last dim must be in_features={K} (weight is [{N}, {K}]), got shape {tuple(x.shape)}")
    if A.dim() != 2 or A.shape[1] != K:
        raise ValueError(f"A must be [rank, in_features={K}], got shape {tuple(A.shape)}")
    R = A.shape[0]
    check_rank(int(R) if torch.jit.is_tracing() else R)  # (torch.jit.trace records sizes as tensors)
    if B.shape != (N, R):
        raise ValueError(f"B must be [out_features={N}, rank={R}], got shape {tuple(B.shape)}")
    for name, t, n in (("bias", bias, N), ("u", u, R), ("v", v, N)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must be 1-D of length {n}, got shape {tuple(t.shape)}")

    dtype, device = x.dtype, x.device
    for name, t in named[1:]:
        if t is None:
            continue
        if t.dtype != dtype and (name in _BASE or t.dtype != torch.float32):
            if name in _BASE:
                autocast = _autocast_dtype(x)
                why = ""
                if autocast is not None and dtype == torch.float64 and t.is_floating_point():
                    why = (
                        f" (autocast to {autocast} casts float32 and float16 tensors, not float64 ones, as F.linear's)"
                    )
                raise TypeError(
                    f"{name} is {t.dtype} but x is {dtype}{why}: the base layer and its input must share a dtype"
                )
            why = f" (autocast's {dtype}: adapters then need float32)" if _autocast_dtype(x) is not None else ""
            raise TypeError(f"{name} is {t.dtype} but x is {dtype}{why}: adapters must be float32 or x's dtype")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}: all inputs must share a device")


_REQUIRED = ("x", "weight", "A", "B")
_BASE = ("weight", "bias")
_FLOAT32_MAX = torch.finfo(torch.float32).max
"""The kernels and the torch path's ``addmm_`` take ``scale`` as a float32."""


def is_finite(value) -> bool:
    """``math.isfinite`` for a real number; an int too large for any float is not finite (instead of an
    ``OverflowError`` from its conversion)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def shown(value) -> str:
    """``repr(value)`` for an error message; an int of more than 128 bits as its size (Python refuses to print
    one of more than 4,300 digits, and a user's 10**5000 would read as that refusal, not as the check)."""
    if type(value) is int and value.bit_length() > 128:
        return f"an int of {value.bit_length()} bits"
    return repr(value)


def first_names(names: list, most: int) -> str:
    """The first ``most`` of ``names`` for an error message, as a list, ``, ...`` after it when there are more."""
    return f"{names[:most]}{', ...' if len(names) > most else ''}"


def is_number(value, kind: type) -> bool:
    """``value`` is a number of ``kind`` (``Real`` or ``Integral``: numpy's too), not a bool. Python's own float
    and int first: an ABC's ``isinstance`` costs a few hundred nanoseconds, and decode checks three numbers per
    call."""
    if type(value) is float:
        return kind is Real
    return type(value) is int or (not isinstance(value, bool) and isinstance(value, kind))


def check_backend_rank(backend: str, rank: int) -> None:
    """``backend="triton"`` at a rank its kernels support, checked where a layer or config is built rather than
    at the first forward (``"auto"`` runs the torch path above it)."""
    from tied_lora_kernels.kernels import configs  # (imports torch only)

    if backend == "triton":
        configs.check_supported_rank(rank)


def check_dropout(p: float) -> None:
    """A dropout probability must be a number in [0, 1)."""
    if not is_number(p, Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {shown(p)}")


def check_seed(seed: int) -> None:
    """A seed must be an int (numpy's too) that ``torch.Generator.manual_seed`` takes, with room for the
    ``apply_tied_lora`` pairs' consecutive seeds."""
    if not is_number(seed, Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not -(2**63) <= seed < 2**64 - 2**32:
        raise ValueError(f"seed must be within [-2**63, 2**64 - 2**32), got {shown(seed)}")


def check_rank(rank: int) -> None:
    """A rank must be a positive int. One above a layer's width is allowed, as PEFT allows it (a narrow layer such
    as a question-answering head then has a pair like the others'): the update's rank is at most
    ``min(in_features, out_features)``, and the factors train as they would otherwise."""
    if not is_number(rank, Integral):
        raise TypeError(f"rank must be an int, got {rank!r}")
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {shown(rank)}")
    if rank >= 2**63:
        raise ValueError(f"rank must be below 2**63 (a tensor's size), got {shown(rank)}")
