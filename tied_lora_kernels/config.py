"""``TiedLoRAConfig``: which layers to adapt and which of ``A, B, u, v`` train, tie and how they start.

Presets (the paper's Table 1 and its two neighbours; any other combination is set with the flags):

| preset | A, B tied | A | B | u | v | init (where from) |
|---|---|---|---|---|---|---|
| ``lora`` | no  | trained | trained | 1, frozen | 1, frozen | A kaiming-uniform, B = 0 (PEFT/Microsoft LoRA) |
| ``tl5``  | yes | trained | trained | 1, frozen | 1, frozen | A kaiming-uniform, B = 0 (zero start needs B = 0) |
| ``tl6``  | yes | trained | trained | trained   | trained   | A, B ~ N(0, 1), u = 1, v = 0 (authors' NeMo code) |
| ``vera`` | yes | frozen  | frozen  | trained   | trained   | A, B kaiming-uniform, u = 0.1, v = 0 (VeRA paper, PEFT) |

Zero start, for every combination of flags: a trained ``v`` starts at 0; otherwise ``v`` is 1 and the first
trained of ``B``, ``u``, ``A`` starts at 0. A model right after ``apply_tied_lora`` computes what the
base model computed: bit for bit on the torch path; on the triton path the adapter term is exactly zero, but the
fused kernel's base GEMM may round differently from cuBLAS. Except in fp16 on either path, where ``u ⊙ x Aᵀ``
past fp16's 65504 is inf and inf times the zero start NaN (docs/backends.md, Numerics).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Real

import torch
from torch import nn

from tied_lora_kernels.functional import (
    BACKENDS,
    check_backend_rank,
    check_dropout,
    check_rank,
    check_seed,
    is_finite,
    is_number,
    shown,
)
from tied_lora_kernels.shared import INITS

__all__ = ["TiedLoRAConfig", "PRESETS", "QKV", "ALL_LINEAR"]

_REGEX_CHARS = set("*+?()[]{}|^$\\")
"""A ``target_modules`` string holding one of these is a regular expression (PEFT's meaning), else a name."""

QKV = ("q_proj", "k_proj", "v_proj")
ALL_LINEAR = "all-linear"
"""``target_modules`` shorthand (PEFT's): every linear layer but the model's output layer or classification head
(which layers count as linear, and which are left out: ``TiedLoRAConfig``)."""

# preset -> (tie, train_A, train_B, train_u, train_v, init, u_init)
PRESETS: dict[str, tuple[bool, bool, bool, bool, bool, str, float]] = {
    "lora": (False, True, True, False, False, "kaiming", 1.0),
    "tl5": (True, True, True, False, False, "kaiming", 1.0),
    "tl6": (True, True, True, True, True, "gaussian", 1.0),
    "vera": (True, False, False, True, True, "kaiming", 0.1),
}


@dataclass
class TiedLoRAConfig:
    """How ``apply_tied_lora`` adapts a model.

    ``target_modules``: module names (a qualified name matches when it equals a target or ends with
    ``"." + target``), a string with regular-expression characters (PEFT's meaning: full-matched against each
    qualified name), a callable ``(module, qualified_name) -> bool``, or ``"all-linear"`` (PEFT's shorthand: every
    ``nn.Linear``, transformers' ``Conv1D`` (GPT-2) and ``FalconLinear``, and bitsandbytes quantized linear, other
    subclasses left out, except the output layer a Hugging Face model's ``get_output_embeddings()`` names or else
    its ``score``/``classifier`` head, the layers whose weight their parent reads itself
    (``targets._WEIGHT_READ_BY_PARENT``) and those whose weight is tied to another module's; only those layer types
    are adapted. ``groups``: tuples of target names that, within one parent module, share one ``A`` and one ``u``
    and stack their ``B`` and ``v`` (q, k and v of a layer: the paper's fused-QKV setup). ``tie``: one ``A``/``B``
    across all layers of a group or target (per shape: the layers whose names differ only in their numeric parts)
    instead of one per layer. ``train_*``, ``tie``, ``init`` and ``u_init`` default to the preset's; ``dtype`` is
    the adapters' dtype (a torch.dtype or its name, "bfloat16"; float32 master weights by default, which run beside
    any model dtype; another dtype must be the one each targeted layer computes in, or ``apply_tied_lora`` refuses
    it; the first forward does, for a quantized layer whose compute dtype bitsandbytes sets only then). ``dropout``:
    dropout on each adapter's input in training mode (PEFT's ``lora_dropout``), on either backend.
    ``modules_to_save`` (PEFT's): names of base modules, matched by name or ``"." + name`` suffix as a list of
    target names is (no regular expression or callable), that train in full and are saved with the adapter, such
    as a new classification head (``("score",)``).

    ``rank``: of every pair; ``alpha``: the scale is ``alpha / rank`` (None: ``rank``, scale 1, as in the paper);
    ``preset``: ``"lora"``, ``"tl5"``, ``"tl6"`` or ``"vera"`` (the table above), whose flags the None fields take;
    ``seed``: the pairs' initial draw; ``backend``: each layer's (``tied_lora_linear``'s ``"auto"``, ``"torch"``,
    ``"triton"``; ``"triton"`` above rank 128 is refused). A field set after construction is checked and resolved
    again, as by the constructor.
    """

    rank: int = 8
    alpha: float | None = None
    target_modules: Sequence[str] | Callable[[nn.Module, str], bool] | str = QKV
    preset: str = "tl6"
    groups: Sequence[Sequence[str]] = (QKV,)
    tie: bool | None = None
    train_A: bool | None = None
    train_B: bool | None = None
    train_u: bool | None = None
    train_v: bool | None = None
    init: str | None = None
    u_init: float | None = None
    seed: int = 0
    dtype: torch.dtype = torch.float32
    backend: str = "auto"
    dropout: float = 0.0
    modules_to_save: Sequence[str] = ()
    # filled by __post_init__: the resolved flags
    resolved: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __setattr__(self, name: str, value) -> None:
        """A field set after construction is checked, normalised and resolved again, as by the constructor (an
        invalid value is refused and the config left as it was), so that what ``apply_tied_lora`` builds and what
        ``to_dict`` saves stay one configuration."""
        settled = "resolved" in self.__dict__ and not self.__dict__.get("_resolving")
        if not settled or name == "resolved" or name not in _FIELDS:
            object.__setattr__(self, name, value)
            return
        before = dict(self.__dict__)
        object.__setattr__(self, name, value)
        try:
            self.__post_init__()
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def __post_init__(self):
        self.__dict__["_resolving"] = True  # (the assignments below are the normalisation itself)
        try:
            self._resolve()
        finally:
            del self.__dict__["_resolving"]

    def _resolve(self) -> None:
        if not isinstance(self.preset, str) or self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        check_rank(self.rank)  # TiedLoRAShared's check: TypeError for a non-int, ValueError for a non-positive one
        self.rank = int(self.rank)
        positive = self.alpha is None or (is_number(self.alpha, Real) and is_finite(self.alpha) and self.alpha > 0)
        if not positive:
            raise ValueError(f"alpha must be a positive finite number or None, got {shown(self.alpha)}")
        if self.alpha is not None and self.alpha / self.rank > torch.finfo(torch.float32).max:
            raise ValueError(f"alpha / rank must be within float32's range, got alpha={shown(self.alpha)}")
        if self.u_init is not None and not (is_number(self.u_init, Real) and is_finite(self.u_init)):
            raise ValueError(f"u_init must be a finite number or None, got {shown(self.u_init)}")
        # plain floats: a numpy scalar would not go into the saved JSON
        self.alpha = None if self.alpha is None else float(self.alpha)
        self.u_init = None if self.u_init is None else float(self.u_init)
        for name in ("tie", "train_A", "train_B", "train_u", "train_v"):
            if not (getattr(self, name) is None or isinstance(getattr(self, name), bool)):  # (1 == True)
                raise TypeError(f"{name} must be True, False or None, got {getattr(self, name)!r}")
        check_seed(self.seed)
        self.seed = int(self.seed)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        check_backend_rank(self.backend, self.rank)
        check_dropout(self.dropout)
        self.dropout = float(self.dropout)
        if isinstance(self.dtype, str):  # a name, as the saved JSON writes it ("bfloat16" or "torch.bfloat16")
            self.dtype = getattr(torch, self.dtype.removeprefix("torch."), self.dtype)
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(
                "dtype must be a floating-point torch.dtype or its name ('bfloat16', 'torch.float32'), "
                f"got {self.dtype!r}"
            )
        for name in ("target_modules", "groups", "modules_to_save"):
            if getattr(self, name) is None or isinstance(getattr(self, name), (int, float)):
                raise TypeError(f"{name} must be a sequence (or () for none), got {getattr(self, name)!r}")
        if isinstance(self.target_modules, str):
            if self.target_modules.lower() == ALL_LINEAR:
                self.target_modules = ALL_LINEAR
            elif _REGEX_CHARS & set(self.target_modules):  # PEFT's: a regex full-matched against each name
                try:
                    re.compile(self.target_modules)
                except re.error as e:
                    wrong = self.target_modules
                    raise ValueError(f"target_modules {wrong!r} is not a regular expression: {e}") from None
            else:
                self.target_modules = (self.target_modules,)
        if not callable(self.target_modules) and not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules is empty")
            if not all(isinstance(t, str) for t in self.target_modules):
                raise TypeError(f"target_modules must be names or a callable, got {self.target_modules!r}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = (self.modules_to_save,)
        self.modules_to_save = tuple(self.modules_to_save)
        if not all(isinstance(name, str) and name for name in self.modules_to_save):
            raise TypeError(f"modules_to_save must be module names, got {self.modules_to_save!r}")
        if not isinstance(self.groups, str):
            self.groups = tuple(self.groups)  # once: a generator would be used up by the check below
        if isinstance(self.groups, str) or any(isinstance(g, str) for g in self.groups):
            raise TypeError(f"groups must be a sequence of tuples of names, e.g. (QKV,), got {self.groups!r}")
        self.groups = tuple(tuple(g) for g in self.groups)
        seen: set[str] = set()
        for g in self.groups:
            if len(g) < 2 or not all(isinstance(t, str) for t in g):
                raise ValueError(f"a group needs at least two target names, got {g}")
            if seen & set(g):
                raise ValueError(f"a target name can be in one group only: {sorted(seen & set(g))}")
            seen |= set(g)

        tie, train_A, train_B, train_u, train_v, init, u_init = PRESETS[self.preset]
        pick = lambda given, default: default if given is None else given  # noqa: E731
        r = dict(
            tie=pick(self.tie, tie),
            train_A=pick(self.train_A, train_A),
            train_B=pick(self.train_B, train_B),
            train_u=pick(self.train_u, train_u),
            train_v=pick(self.train_v, train_v),
            init=pick(self.init, init),
            u_init=float(pick(self.u_init, u_init)),
        )
        if r["init"] not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {r['init']!r}")
        if not any(r[k] for k in ("train_A", "train_B", "train_u", "train_v")):
            raise ValueError("this configuration trains none of A, B, u, v")
        # the zero start: exactly one factor of ΔW starts at zero (see the module docstring)
        r["v_init"] = 0.0 if r["train_v"] else 1.0
        zero = None if r["train_v"] else next(k for k in ("B", "u", "A") if r[f"train_{k}"])
        r["zero_B"], r["zero_A"] = zero == "B", zero == "A"
        if zero == "u":
            r["u_init"] = 0.0
        self.resolved = r

    def to_dict(self) -> dict:
        """A JSON-able description (a callable ``target_modules`` is recorded as None: a saved adapter's layout,
        the adapted layers' names, stands for it)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "resolved"}
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        if callable(self.target_modules):
            out["target_modules"] = None  # a callable is not saved: the adapted layers' names stand for it
        elif isinstance(self.target_modules, str):  # "all-linear" or a regular expression
            out["target_modules"] = self.target_modules
        else:
            out["target_modules"] = list(self.target_modules)
        out["groups"] = [list(g) for g in self.groups]
        out["modules_to_save"] = list(self.modules_to_save)
        return out


_FIELDS = frozenset(f.name for f in dataclasses.fields(TiedLoRAConfig))
