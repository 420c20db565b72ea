"""Ahead-of-time compile of every shipped kernel config for every GPU it runs on, no GPU needed (docs/design.md §6-§7).

    python -m tied_lora_kernels.kernels.compile_check [--full] [--jobs N] [--json PATH] [--partial PATH]
        [--targets 90,80] [--only NAME] [--off HAS_BIAS,HAS_RSCALE,HAS_CSCALE]

For each config of ``configs.py``, each GPU its table is launched on (``configs.arch_of``: the sm90 table on
Hopper sm_90 and datacenter Blackwell sm_100, the sm80 table on Ampere sm_80 and consumer Blackwell sm_120;
Ada's sm_89 runs sm_80's instructions and is not compiled separately), each launch variant and each dtype,
compiles with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and prints registers and
spills (the ``ptxas -v`` log of triton's own build), shared memory and which tensor-core instruction the PTX uses
(``wgmma`` on Hopper, ``tcgen05`` on datacenter Blackwell, ``mma`` (mma.sync) elsewhere, ``-`` for none).
Each row also records the ptxas that assembled it (``ptxas``: for sm_90 the one a launch will use,
``kernels.hopper_ptxas``) and counts its ``wgmma`` instructions that read ``A`` from registers
(``wgmma_register_a``: what ptxas 12.9 can corrupt, ``kernels.FIXED_HOPPER_PTXAS``).
Launch variants mirror what the launchers pass, with the JIT's specialisations: unit strides
become constants and pointers, sizes and long strides carry 16-byte divisibility hints (``s·v ⊙ B``'s row
stride is padded to 16 elements by ``prepare.prepare_adapters``, so it carries one too).

- ``fwd``: the forward ``y = x Wᵀ + …`` (W read transposed), bias and ``u`` on, as ``function.py`` passes
  the adapters: prefill with ``A`` cast and ``s·v ⊙ B`` folded on the host (16-aligned rows), decode with the
  fp32 master ``A`` and ``B`` and ``v`` folded in the kernel — ``fwd`` for a rank that is a multiple of 16,
  ``fwd-oddR`` for one that is not (``B``'s row stride is then unaligned); one-pass configs store ``T``,
  two-pass configs (names ending ``-2pass``, compiled once with their rank chunk) load it;
- ``dx``: the backward ``dx = dy W + …`` (W read as stored, ``A`` the fp32 master), no bias;
- ``fwd-splitk`` / ``dx-splitk``: the same with split-K (fp32 partial outputs), 16-bit decode configs only,
  and ``sum``: the split-K sum of the partials; ``-splitk-reduce``: split-K with the partials summed by each
  tile's last slice in the same launch (``forcing.split_reduce``: "kernel"; ``lock_ptr`` is typed int32 and
  ``y_ptr`` as the input in every row, where the launcher passes the output for those unused pointers);
  ``-splitk-apart`` (one-pass configs): the rank-apart GEMM (``forcing.split_rank``: "apart", the default),
  base partials and per-slice ``t`` from rank programs, no bias, and ``-splitk-apart-sum`` its sum launch
  (``_sum_splits_rank_kernel`` with the GEMM's output tile: partials and ``t`` summed, the rank-R term from the
  fp32 master ``B`` (forward, with bias and ``v``) or ``A`` (dx), ``T`` stored; ``fwd-oddR``: ``t``'s and
  ``B``'s rows without divisibility hints);
- ``T`` / ``dS``: the two-pass shrink of ``x`` (by ``Aᵀ``) and of ``dy`` (by ``v ⊙ B``);
- ``G``: ``dyᵀ S`` with atomics (the default), finished in its epilogue into ``dB``, ``dv`` and ``du`` (every
  switch on: TL6); ``dA``: ``xᵀ dT`` into a transposed output, deterministic;
- ``prep``: ``A`` cast and ``s·v ⊙ B`` folded for a prefill launch (``prepare.py``), for each input width;
- ``-dropout`` (adapter dropout, ``dropout.py``): ``T-dropout``, the shrink drawing the keep mask and storing
  its bits; ``dx-dropout``, two-pass configs only, the rank-R term masked from the bits (and its split-K and
  TMA forms where the config has them); ``dA-dropout``, ``x``'s tiles masked. The bits' row stride
  (``ceil(K/8)``) carries no divisibility hint.

Switches that only remove work are compiled on: the bias, ``u`` and ``v`` (``HAS_BIAS``, ``HAS_RSCALE``,
``HAS_CSCALE``). A layer without them (Llama's projections have no bias, the LoRA preset neither ``u`` nor ``v``)
runs a specialisation of its own, lighter but not always spill-free: under triton 3.9's ptxas options a few
spilled where the row with every switch on did not (8 bytes to 1.3 KB). ``--off HAS_BIAS,HAS_RSCALE`` compiles
every row with those switches off: the tests compile the default; the ``--off`` sweeps are run by hand (their
results: benchmarks/results/README.md). Adapters kept in the input dtype instead of fp32 (allowed, not the default)
change only the element type of the ``A``/``B`` loads; those variants are not compiled here either. A compile
that fails is reported as an ``ERROR`` row (and a failure), not an exception that loses the other rows.

By default 16-bit configs compile for bf16 (fp16 differs only in the MMA instruction's type, except in
one-pass split-K with the rank-R term in each output tile, which scales its partial ``t`` into fp16's range:
those variants compile for fp16 as well) and 32-bit ones for exact fp32 (torch's default); ``--full`` adds
fp16 and TF32. Every run compiles afresh (``TRITON_ALWAYS_COMPILE``: a kernel found in triton's cache runs no
ptxas, and its ``ptxas -v`` log is what gives the registers). Must run with ``TRITON_INTERPRET`` unset (the tests
run it as a subprocess): under the interpreter ``triton.jit`` gives objects that cannot compile.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import interpreting
from .common import FP_FUSION
from .forward import RANK_APART_BLOCK_R
from .prepare import PREPARE_BLOCK, PREPARE_WARPS
from .split_sum import RANK_SUM_CHUNK, RANK_SUM_WARPS, SUM_BLOCK, SUM_WARPS

TARGETS = {"sm90": (90, 100), "sm80": (80, 120)}
"""Compute capabilities each config table is compiled for: the GPUs ``configs.arch_of`` gives it to."""

SWITCHES = ("HAS_BIAS", "HAS_RSCALE", "HAS_CSCALE")
"""Constexpr switches the compile check turns on (the bias, ``u``, ``v``) and ``--off`` turns off: each is a
specialisation of its own, as the JIT compiles it for a layer without that tensor."""

# variant -> (kernel, args equal to 1, args with divisibility 16, constexpr switches). The fused variants'
# LOAD_T / WRITE_T follow the config's strategy (``_fused_switches``); "-splitk" adds SPLIT_K (decode only).
_VARIANTS = {
    "fwd": (
        "fused",
        ("stride_ak", "stride_wk", "stride_dk", "stride_ur", "stride_on", "stride_tr"),
        ("N", "K", "stride_am", "stride_wn", "stride_dr", "stride_un", "stride_om"),
        dict(HAS_RSCALE=True, HAS_BIAS=True),  # FOLD_UP, HAS_CSCALE: by regime (compile_one)
    ),
    "dx": (
        "fused",
        ("stride_ak", "stride_wn", "stride_dr", "stride_un", "stride_on", "stride_tr"),
        ("N", "K", "stride_am", "stride_wk", "stride_dk", "stride_ur", "stride_om"),
        dict(HAS_RSCALE=True, FOLD_UP=True, HAS_CSCALE=False, HAS_BIAS=False),  # up = A, the fp32 master
    ),
    # the shrink of x (down = Aᵀ, read transposed) and of dy (down = v ⊙ B as stored)
    "T": ("shrink", ("stride_ak", "stride_dk", "stride_tr"), ("K", "stride_am", "stride_dr"), {}),
    "dS": ("shrink", ("stride_ak", "stride_dr", "stride_tr"), ("K", "stride_am", "stride_dk"), {}),
    "G": (
        "rank",
        ("stride_ac", "stride_pr", "stride_or", "stride_br"),
        ("C", "stride_am"),
        dict(HAS_RSCALE=True, WRITE_OUT=True, HAS_OVEC=True, ROWDOT=True, COLDOT=True, USE_ATOMIC=True),
    ),
    "dA": (
        "rank",
        ("stride_ac", "stride_pr", "stride_oc"),
        ("C", "stride_am", "stride_os", "stride_or"),
        dict(HAS_RSCALE=True, WRITE_OUT=True, HAS_OVEC=False, ROWDOT=False, COLDOT=False, USE_ATOMIC=False),
    ),
    "sum": ("sum", (), ("NUMEL", "stride_ps"), {}),
    # the rank-apart sum (``-apart-sum``) after the decode forward (up = B as stored, bias) and dx (up = A)
    "fwd-rank-sum": (
        "rank_sum",
        ("stride_ur",),
        ("N", "R", "stride_ps", "stride_pm", "stride_tm", "stride_un", "stride_om", "stride_sm"),
        dict(HAS_RSCALE=True, FOLD_UP=True, HAS_CSCALE=True, HAS_BIAS=True, WRITE_T=True),
    ),
    "dx-rank-sum": (
        "rank_sum",
        ("stride_un",),
        ("N", "R", "stride_ps", "stride_pm", "stride_tm", "stride_ur", "stride_om", "stride_sm"),
        dict(HAS_RSCALE=True, FOLD_UP=True, HAS_CSCALE=False, HAS_BIAS=False, WRITE_T=True),
    ),
    "prep": ("prepare", ("stride_ak", "stride_br"), ("stride_bon",), dict(CAST_A=True, HAS_V=True)),
}
_FP32_POINTERS = {
    "fused": ("rscale_ptr", "cscale_ptr", "up_ptr", "t_ptr"),  # up: B (forward) or A (dx), fp32 masters
    "shrink": ("t_ptr",),
    "rank": ("p_ptr", "rscale_ptr", "ovec_ptr", "rowmat_ptr", "out_ptr", "rowdot_ptr", "coldot_ptr"),
    "sum": ("part_ptr",),
    "rank_sum": ("part_ptr", "t_ptr", "rscale_ptr", "up_ptr", "cscale_ptr", "tsum_ptr"),
    "prepare": ("a_ptr", "b_ptr", "v_ptr"),  # the fp32 masters in, the input dtype out
}
_TYPED_POINTERS = {"lock_ptr": "*i32", "seed_ptr": "*i64", "bits_ptr": "*u8"}
_FLOAT_ARGS = ("scale", "drop_scale")
_TL_NAME = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class _ElementwiseConfig:
    """The launch configuration of an elementwise kernel as a config row: the split-K sum
    (``split_sum.SUM_BLOCK``, ``split_sum.SUM_WARPS``) or the adapters' preparation (``prepare.PREPARE_*``)."""

    name: str
    block: int
    num_warps: int
    num_stages: int = 1


def variants_of(kernel: str, cfg) -> list[str]:
    """The launch variants of one config: decode fused configs add ``fwd-oddR`` and, 16-bit, split-K variants;
    the 16-bit prefill configs of the table a TMA GPU launches add ``fwd-tma`` and ``dx-tma``. The unaligned
    fused configs compile ``fwd-unaligned`` and ``dx-unaligned`` (no divisibility hints at all; decode: and
    their split-K forms) instead, the unaligned shrink configs ``T-unaligned`` and ``dS-unaligned``. Dropout
    adds ``T-dropout``, ``dA-dropout`` and (two-pass) ``dx-dropout`` where ``configs.launches`` says a dropout
    launch gets the config; a dropout-only config compiles those alone."""
    if kernel in ("fused", "shrink") and not _launched(cfg, dropout=False):
        names = ["dx-dropout"] if kernel == "fused" else ["T-dropout"]
    elif kernel in ("fused", "shrink") and not cfg.aligned:
        names = ["fwd-unaligned", "dx-unaligned"] if kernel == "fused" else ["T-unaligned", "dS-unaligned"]
        names += _dropout_variants(kernel, cfg, names)
        return names + _split_variants(names, cfg) if getattr(cfg, "split_k", False) else names
    else:
        names = [v for v, spec in _VARIANTS.items() if spec[0] == kernel]
        names += _dropout_variants(kernel, cfg, names)
    if kernel == "fused" and _regime(cfg.name) == "decode" and "fwd" in names:
        names.insert(1, "fwd-oddR")
    if kernel == "fused" and cfg.split_k:
        names += _split_variants(names, cfg)
    if kernel == "fused" and _regime(cfg.name) == "prefill" and _tma_table(cfg.name):
        names += [f"{v}-tma" for v in names]
    return names


def _dropout_variants(kernel: str, cfg, names: list[str]) -> list[str]:
    """The dropout forms of a config's variants: the forward's shrink (``T``), ``dA``, and two-pass ``dx``."""
    base = {"fused": "dx", "shrink": "T", "rank": "dA"}.get(kernel)
    if base is None or (kernel in ("fused", "shrink") and not _launched(cfg, dropout=True)):
        return []
    return [v.replace(base, f"{base}-dropout", 1) for v in names if v.split("-")[0] == base]


def _launched(cfg, *, dropout: bool) -> bool:
    """Whether a launch with or without adapter dropout can get ``cfg`` (``configs.launches``)."""
    from . import configs

    return configs.launches(cfg, dropout=dropout)


def _split_variants(names: list[str], cfg) -> list[str]:
    """Split-K forms of fused variants: partials summed by the sum launch, or in the kernel (``-reduce``); for
    one-pass configs also the rank-apart GEMM and its sum launch (``-apart``, ``-apart-sum``)."""
    out = [f"{v}-splitk{reduce}" for reduce in ("", "-reduce") for v in names]
    if cfg.strategy == "one_pass":
        out += [f"{v}-splitk-apart{sum_}" for sum_ in ("", "-sum") for v in names]
    return out


def _fp16_differs(kernel: str, cfg, variant: str) -> bool:
    """Whether fp16 compiles other code than bf16 for this variant: one-pass split-K with the rank-R term in
    each output tile (its partial ``t`` scaled per row into fp16's range, ``rank_terms._add_rank_update``)."""
    in_tile = "-splitk" in variant and "-apart" not in variant
    return kernel == "fused" and cfg.strategy == "one_pass" and in_tile


def _tma_table(name: str) -> bool:
    """Whether the launcher loads this config's tiles through TMA on some GPU (``configs.tma_for``): 16-bit
    prefill of a table that a ``TMA_MAJORS`` GPU launches (compiled for those targets only, ``jobs``)."""
    from . import configs

    arch, _, width = name.split("-")[:3]
    return width == "16bit" and arch in {configs.table_for_major(m) for m in configs.TMA_MAJORS}


def _regime(name: str) -> str:
    return name.split("-")[1]  # configs.py names its configs "{arch}-{regime}-..."


def _fused_switches(config: dict, split: bool) -> dict:
    two_pass = config["strategy"] == "two_pass"
    return dict(WRITE_T=not two_pass, LOAD_T=two_pass, SPLIT_K=split)


def jobs(full: bool = False, targets: tuple[int, ...] | None = None) -> list[dict]:
    """Every (variant, config, BLOCK_R, dtype, table, target) to compile; ``targets`` keeps only those ccs."""
    from . import configs

    out = []
    tables: tuple[tuple[str, list], ...] = (
        ("fused", configs.all_fused_configs()),
        ("shrink", configs.all_shrink_configs()),
        ("rank", configs.all_rank_grad_configs()),
    )
    # the split-K sum: one launch config, for each table that splits K (16-bit)
    split_archs = sorted({arch for arch, cfg, _, _ in configs.all_fused_configs() if cfg.split_k})
    tables += (("sum", [(arch, _ElementwiseConfig(f"{arch}-splitk-sum", SUM_BLOCK, SUM_WARPS), 0, False)
                        for arch in split_archs]),)  # fmt: skip
    prepare = [(arch, _ElementwiseConfig(f"{arch}-prepare", PREPARE_BLOCK, PREPARE_WARPS), 0, wide)
               for arch in configs.ARCHS for wide in (False, True)]  # fmt: skip
    tables += (("prepare", prepare),)
    for kernel, table in tables:
        for arch, cfg, block_r, wide in table:
            if wide:  # exact IEEE by default (torch's default), TF32 when torch allows it
                dtypes = [("float32", "ieee"), ("float32", "tf32")] if full else [("float32", "ieee")]
            else:
                dtypes = [("bfloat16", "ieee"), ("float16", "ieee")] if full else [("bfloat16", "ieee")]
            for cc in TARGETS[arch]:
                if targets and cc not in targets:
                    continue
                for variant in variants_of(kernel, cfg):
                    if variant.endswith("-tma") and cc // 10 not in configs.TMA_MAJORS:
                        continue  # that GPU launches this table with pointer loads
                    fp16 = [("float16", "ieee")] if _fp16_differs(kernel, cfg, variant) and not full else []
                    for dtype, precision in dtypes + fp16:
                        out.append(
                            dict(
                                variant=variant,
                                config=cfg.__dict__,
                                block_r=block_r,
                                dtype=dtype,
                                precision=precision,
                                arch=arch,
                                target=f"sm_{cc}",
                            )
                        )
    return out


_PRINT_PTXAS_LOG = {"TRITON_DUMP_PTXAS_LOG": "1", "TRITON_ALWAYS_COMPILE": "1"}
PRINTS_PTXAS_LOG = (3, 5)
"""The first triton release that prints the ``ptxas -v`` log of its own build under ``TRITON_DUMP_PTXAS_LOG``
(3.4 does not: the check runs ptxas itself there)."""


@contextlib.contextmanager
def _triton_ptxas_log():
    """Capture the ``ptxas -v`` log of triton's own cubin build, which ``TRITON_DUMP_PTXAS_LOG`` prints (triton
    >= 3.5): the registers and spills of the very code the JIT builds, with its ptxas options, for no second
    ptxas run (which took ~15 % of this check). ``TRITON_ALWAYS_COMPILE``: a kernel found in triton's cache would
    skip ptxas and print nothing."""
    saved = {name: os.environ.get(name) for name in _PRINT_PTXAS_LOG}
    os.environ.update(_PRINT_PTXAS_LOG)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            yield printed
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def _ptxas_log(ptx: str, arch: int) -> str:
    """``ptxas -v``'s log for ``ptx`` (for a triton that does not print its own)."""
    from triton.backends.nvidia import compiler

    from .ptxas import _ptxas

    ptxas = _ptxas(compiler, arch).path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        cubin = os.path.join(tmp, "kernel.cubin")
        command = [ptxas, "-lineinfo", "-v", f"--gpu-name={gpu}", path, "-o", cubin]
        return subprocess.run(command, capture_output=True, text=True, check=True).stderr


class _Inputs(NamedTuple):
    """What ``triton.compile`` is given for one job: the kernel, its signature, constexprs and argument attributes,
    the target's compute capability and the launch options."""

    fn: Any
    signature: dict
    constexprs: dict
    attrs: dict
    arch: int
    num_warps: int
    num_stages: int


def _compile_inputs(job: dict) -> _Inputs:
    """The compile of one job, as the launchers' JIT specialises it (see the module docstring)."""
    from .backward import _rank_grad_kernel
    from .forward import _fused_lora_mm_kernel
    from .prepare import _prepare_kernel
    from .shrink import _shrink_kernel
    from .split_sum import _sum_splits_kernel, _sum_splits_rank_kernel

    variant, tma = job["variant"].removesuffix("-tma"), job["variant"].endswith("-tma")
    variant, rank_sum = variant.removesuffix("-apart-sum"), variant.endswith("-apart-sum")
    variant, apart = variant.removesuffix("-apart"), variant.endswith("-apart")
    variant, reduce = variant.removesuffix("-reduce"), variant.endswith("-reduce")
    base, split = variant.removesuffix("-splitk"), variant.endswith("-splitk")
    odd_rank, unaligned = base.endswith("-oddR"), base.endswith("-unaligned")
    base = base.removesuffix("-unaligned")
    base, dropout = base.removesuffix("-dropout"), base.endswith("-dropout")
    if rank_sum:  # the sum launch after the rank-apart GEMM of variant base (fwd, fwd-oddR, dx)
        kernel, ones, divisible, switches = _VARIANTS[f"{base.removesuffix('-oddR')}-rank-sum"]
        if odd_rank:  # t's and B's rows unaligned
            divisible = tuple(d for d in divisible if d not in ("R", "stride_tm", "stride_un", "stride_sm"))
    else:
        kernel, ones, divisible, switches = _VARIANTS[base.removesuffix("-oddR")]
    if unaligned:  # N, K and the strides not multiples of 16: the JIT gives no divisibility hints
        divisible = ()
    fn: Any = {"fused": _fused_lora_mm_kernel, "shrink": _shrink_kernel, "rank": _rank_grad_kernel}.get(kernel)
    fn = _sum_splits_rank_kernel if kernel == "rank_sum" else fn
    cfg, tl_dtype = job["config"], _TL_NAME[job["dtype"]]
    fp32_pointers = _FP32_POINTERS[kernel]
    constexprs = dict(switches, UPCAST=False, PRECISION=job["precision"], BLOCK_R=job["block_r"], DROPOUT=dropout)
    if rank_sum:  # it walks the rank in fixed chunks (split_sum.sum_splits_rank)
        constexprs.update(BLOCK_R=RANK_SUM_CHUNK)
    if kernel == "fused":
        constexprs.update(BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"])
        constexprs.update(GROUP_M=cfg["group_m"])
        constexprs.update(_fused_switches(cfg, split), REDUCE=reduce, RANK_APART=apart)
        constexprs.update(BLOCK_TR=min(job["block_r"], RANK_APART_BLOCK_R))
        if apart:  # t stored per K slice by the rank programs; the rank-R term and the bias in the sum launch
            constexprs.update(WRITE_T=False, HAS_BIAS=False)
        divisible = (*divisible, "K_PER_SPLIT")  # whole BLOCK_K steps
        if split:  # the output is the fp32 partials workspace
            fp32_pointers = (*fp32_pointers, "out_ptr")
        if _reads_masters(job):  # A and B as stored (fp32), v folded in the kernel
            fp32_pointers = (*fp32_pointers, "down_ptr")
            constexprs.update(FOLD_UP=True, HAS_CSCALE=True)
        elif base == "fwd":  # s·v ⊙ B prepared on the host in the input dtype
            constexprs.update(FOLD_UP=False, HAS_CSCALE=False)
            fp32_pointers = tuple(p for p in fp32_pointers if p != "up_ptr")
        if odd_rank:
            divisible = tuple(d for d in divisible if d != "stride_un")
        constexprs.update(TMA=tma, W_KN=tma and base == "dx", DOWN_KR=tma and base == "dx")
    elif kernel == "shrink":  # (a dropout forward under no_grad stores no bits: work removed, not compiled)
        constexprs.update(BLOCK_M=cfg["block_m"], BLOCK_K=cfg["block_k"], STORE_BITS=dropout)
    elif kernel == "rank":
        constexprs.update(BLOCK_C=cfg["block_c"], BLOCK_M=cfg["block_m"])
    elif kernel == "rank_sum":  # the output tile of the GEMM it follows, in the input dtype
        constexprs.update(BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"])
        constexprs.pop("DROPOUT")
    elif kernel == "sum":  # the split-K sum: no dot, no rank
        fn, constexprs = _sum_splits_kernel, dict(UPCAST=False, BLOCK=cfg["block"])
    else:  # the adapters' preparation: no dot, no rank
        fn, constexprs = _prepare_kernel, dict(switches, UPCAST=False, BLOCK=cfg["block"])
    for switch, on in job.get("switches", {}).items():  # --off: a layer without a bias, u or v
        if switch in constexprs:
            constexprs[switch] = on
    descriptors = _descriptor_types(job, base, tl_dtype) if tma else {}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in descriptors:
            signature[name] = descriptors[name]
        elif name in constexprs:
            signature[name] = "constexpr"
        elif name in ones:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in _TYPED_POINTERS:  # the split-K arrival counts, the dropout seed and mask bits
            signature[name] = _TYPED_POINTERS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in fp32_pointers else f"*{tl_dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    arch = int(job["target"].removeprefix("sm_"))
    stages = 1 if rank_sum else cfg["num_stages"]  # (the rank-apart sum has no dot to pipeline: split_sum.py)
    warps = RANK_SUM_WARPS if rank_sum else cfg["num_warps"]
    return _Inputs(fn, signature, constexprs, attrs, arch, warps, stages)


def compile_one(job: dict) -> dict:
    """Compile one job; returns the job with registers, spill bytes, shared memory and wgmma count."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs, arch, warps, stages = _compile_inputs(job)
    with _assembler(arch) as ptxas_version, _triton_ptxas_log() as printed:
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs),
            target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=FP_FUSION),
        )
    ptx, log, log_from = compiled.asm["ptx"], printed.getvalue(), "triton"
    if not re.search(r"Used \d+ registers", log):  # triton < PRINTS_PTXAS_LOG prints no log: run ptxas -v here
        log, log_from = _ptxas_log(ptx, arch), "ptxas -v"
    used = re.search(r"Used (\d+) registers", log)
    if used is None:
        raise RuntimeError(f"ptxas -v printed no register count for {job['config']['name']}:\n{log[-2000:]}")
    registers = int(used.group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return dict(
        job,
        name=job["config"]["name"],
        registers=registers,
        spill_bytes=spills,
        shared=int(compiled.metadata.shared),
        shared_limit=_shared_limit(job["arch"]),
        wgmma=ptx.count("wgmma.mma_async"),
        wgmma_register_a=len(_REGISTER_A_WGMMA.findall(ptx)),
        tma=ptx.count("cp.async.bulk.tensor"),
        tcgen05=ptx.count("tcgen05.mma"),
        mma=_mma_kind(ptx),
        serialized_wgmma="C7515" in log,
        ptxas_log=log_from,
        ptxas=ptxas_version,
    )


@contextlib.contextmanager
def _assembler(arch: int) -> Iterator[str]:
    """Assemble as a launch on that GPU will: on Hopper with the ptxas ``kernels.hopper_ptxas`` makes triton use
    there (triton 3.8: its bundled 13.3, not its 12.9, which can corrupt the rank-R term's register-input wgmma);
    yields that ptxas's version."""
    from triton.backends.nvidia import compiler

    from .ptxas import _hopper_ptxas_choice, _ptxas

    # (as on a machine whose driver loads what the newer ptxas builds)
    newer = _hopper_ptxas_choice(None)[1] if arch == 90 else None
    saved = os.environ.get("TRITON_PTXAS_PATH")  # (one triton could not use and fell back from, say)
    if newer is not None:
        os.environ["TRITON_PTXAS_PATH"] = newer.path
    try:
        yield _ptxas(compiler, arch).version
    finally:
        if newer is not None:
            os.environ.pop("TRITON_PTXAS_PATH")
            if saved is not None:
                os.environ["TRITON_PTXAS_PATH"] = saved


def _descriptor_types(job: dict, base: str, tl_dtype: str) -> dict:
    """The TMA descriptors the launcher passes (``forward._descriptors``): ``a`` as ``[BLOCK_M, BLOCK_K]``;
    ``W`` stored ``[N, K]`` (forward) or ``[K, N]`` (dx); one-pass ``down`` stored ``[R, K]`` (``A``,
    forward) or ``[K, R]`` (``v ⊙ B``, dx)."""
    cfg, block_r = job["config"], job["block_r"]
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    fwd = base == "fwd"
    blocks = {"a_ptr": (bm, bk), "w_ptr": (bn, bk) if fwd else (bk, bn)}
    if cfg["strategy"] == "one_pass":
        blocks["down_ptr"] = (block_r, bk) if fwd else (bk, block_r)
    return {name: f"tensordesc<{tl_dtype}[{r}, {c}]>" for name, (r, c) in blocks.items()}


def _compile_or_error(job: dict) -> dict:
    try:
        return compile_one(job)
    except Exception as e:  # noqa: BLE001 (one failing compile must not lose the other rows)
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        return dict(job, name=job["config"]["name"], registers=0, spill_bytes=0, shared=0, wgmma=0, tma=0, tcgen05=0,
                    wgmma_register_a=0, shared_limit=_shared_limit(job["arch"]), mma="-", serialized_wgmma=False,
                    ptxas_log="-", error=reason)  # fmt: skip


def _reads_masters(job: dict) -> bool:
    """The decode forward reads the fp32 master ``A`` and ``B`` (``function.py``); prefill gets them cast."""
    return job["variant"].startswith("fwd") and _regime(job["config"]["name"]) == "decode"


_REGISTER_A_WGMMA = re.compile(r"wgmma\.mma_async[^;{]*\{[^}]*\}\s*,\s*\{")
"""A ``wgmma`` whose ``A`` operand is a register vector (``{d...}, {a...}, descB``) rather than a shared-memory
descriptor (``{d...}, descA, descB``): the epilogue dot of a tile whose ``t`` is computed in registers."""


def _mma_kind(ptx: str) -> str:
    for kind, instruction in (("wgmma", "wgmma.mma_async"), ("tcgen05", "tcgen05.mma"), ("mma", "mma.sync")):
        if instruction in ptx:
            return kind
    return "-"


def _key(job: dict) -> tuple:
    """What the compile of ``job`` depends on: jobs with equal keys are given the same ``triton.compile`` inputs
    (configs with equal tiles; the rank-apart sum after GEMMs whose output tiles are equal, whatever their K
    steps), so they compile once and each gets its row. With the table, which sets the shared-memory limit."""
    try:
        fn, signature, constexprs, attrs, arch, warps, stages = _compile_inputs(job)
    except Exception:  # noqa: BLE001 (a job of its own: its compile fails and is reported as an ERROR row)
        return ("unkeyed", id(job))
    return (
        job["arch"], fn.__name__, _sorted(signature), _sorted(constexprs), _sorted(attrs), arch, warps, stages
    )  # fmt: skip


def _sorted(mapping: dict) -> tuple:
    return tuple(sorted((repr(k), repr(v)) for k, v in mapping.items()))


def _shared_limit(arch: str) -> int:
    from . import configs

    return configs.SHARED_MEMORY_LIMIT[arch]


def _row(result: dict, job: dict) -> dict:
    return dict(result, **job, name=job["config"]["name"])


def format_table(rows: list[dict]) -> str:
    import triton

    head = f"{'kernel':20} {'config':40} {'BLOCK_R':>7} {'dtype':9} {'target':6} {'regs':>4} {'spills':>6} "
    head += f"{'smem':>7} {'mma':>7} {'loads':>5}"
    lines = [f"triton {triton.__version__}", head]
    for r in rows:
        c = r["config"]
        if "block_n" in c:
            tiles = f"{c['block_m']}x{c['block_n']}x{c['block_k']}"
        elif "block_k" in c:
            tiles = f"{c['block_m']}x{c['block_k']}"
        elif "block_c" in c:
            tiles = f"{c['block_c']}x{c['block_m']}"
        else:
            tiles = str(c["block"])
        tiles = f"{r['name']} {tiles}"
        lines.append(
            f"{r['variant']:20} {tiles:40} {r['block_r']:>7} {r['dtype']:9} {r['target']:6} {r['registers']:>4} "
            f"{r['spill_bytes']:>6} {r['shared']:>7} {r['mma']:>7} {'tma' if r.get('tma') else 'ptr':>5}"
            + ("  (tf32)" if r["precision"] == "tf32" else "")
            + ("  ERROR (see FAIL below)" if r.get("error") else "")
        )
    assembled = sorted({(int(r["target"].removeprefix("sm_")), r["ptxas"]) for r in rows if r.get("ptxas")})
    lines.append("assembled by ptxas " + ", ".join(f"{version} (sm_{arch})" for arch, version in assembled))
    register_a = sum(bool(r.get("wgmma_register_a")) for r in rows)
    lines.append(f"rows with a wgmma reading A from registers (kernels.FIXED_HOPPER_PTXAS): {register_a}")
    sources = {source: sum(r.get("ptxas_log") == source for r in rows) for source in ("triton", "ptxas -v")}
    lines.append(
        f"registers and spills from the ptxas -v log of triton's own build: {sources['triton']} rows; from a separate "
        f"ptxas -v run with its default options (a triton that prints no log): {sources['ptxas -v']} rows"
    )
    return "\n".join(lines)


def _libc_prctl() -> Any:
    try:
        return ctypes.CDLL(None).prctl if sys.platform == "linux" else None
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()
"""libc's ``prctl``, looked up at import: ``_die_with_parent`` also runs between a fork and an exec (``preexec_fn``),
where loading a library or importing a module could deadlock on a lock another thread held at the fork."""


def _die_with_parent() -> None:
    """Have this process killed when its parent dies (Linux; elsewhere nothing): a compile worker of a check that was
    killed, or a check started by a test session that was, stops at once. (A worker's parent is the check, or
    under the forkserver start method, Python 3.14's default, the fork server, which exits with the check.)"""
    if _PRCTL is None:
        return
    parent = os.getppid()
    _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # (it died before the call above)
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])  # (python -OO: no docstring)
    parser.add_argument("--full", action="store_true", help="also compile fp16 and fp32 with TF32")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    parser.add_argument(
        "--partial",
        help="append each row to this path as a line of JSON as soon as its compile finishes (the table and --json "
        "come at the end; this keeps what finished when a time limit stops the run)",
    )
    parser.add_argument("--only", help="compile only configs whose name contains this string")
    parser.add_argument("--targets", help="compile only for these compute capabilities, e.g. 90,80 (default: all)")
    parser.add_argument(
        "--off",
        default="",
        help=f"compile with these switches off, e.g. HAS_BIAS,HAS_RSCALE (of {', '.join(SWITCHES)}; default: all on)",
    )
    args = parser.parse_args(argv)
    targets = tuple(int(t) for t in args.targets.split(",")) if args.targets else None
    off = [s for s in args.off.split(",") if s]
    if set(off) - set(SWITCHES):
        parser.error(f"--off takes {', '.join(SWITCHES)}, got {args.off!r}")
    if interpreting():
        print("compile_check: unset TRITON_INTERPRET (the interpreter cannot compile)", file=sys.stderr)
        return 2
    todo = [j for j in jobs(args.full, targets) if not args.only or args.only in j["config"]["name"]]
    if off:
        todo = [dict(j, switches=dict.fromkeys(off, False)) for j in todo]
    # jobs given the same compile inputs (e.g. fp32 decode and prefill configs with equal tiles) compile once
    keys = [_key(job) for job in todo]
    named: dict[tuple, list[dict]] = {}
    for key, job in zip(keys, todo, strict=True):
        named.setdefault(key, []).append(job)
    results = {}
    with contextlib.ExitStack() as stack:
        partial = stack.enter_context(open(args.partial, "a", buffering=1)) if args.partial else None
        pool = stack.enter_context(ProcessPoolExecutor(max_workers=max(1, args.jobs), initializer=_die_with_parent))
        futures = {pool.submit(_compile_or_error, same[0]): key for key, same in named.items()}
        for done in as_completed(futures):
            key = futures[done]
            results[key] = done.result()
            if partial is not None:
                partial.writelines(json.dumps(_row(results[key], job)) + "\n" for job in named[key])
    rows = [_row(results[key], job) for key, job in zip(keys, todo, strict=True)]
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if r["spill_bytes"] or r["shared"] > r["shared_limit"] or r.get("error")]
    for r in bad:
        what = r.get("error") or f"{r['spill_bytes']} spill bytes, {r['shared']} B smem"
        print(f"FAIL {r['variant']} {r['name']} {r['dtype']} {r['target']}: {what}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
