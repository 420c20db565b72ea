"""Every block configuration and strategy the launchers can pick, in one place (the compile check walks the
same tables).

Three kernels have tiles here: the fused GEMM (forward ``y``, backward ``dx``; ``forward.py``), the shrink
(``T = x Aᵀ`` or ``dS / s = dy (v ⊙ B)``, two-pass only; ``shrink.py``) and the rank-gradient reduction
(``G = dyᵀ S`` and ``dAᵀ = xᵀ dT``; ``backward.py``); of the other three, the split-K sum with the rank-R term
apart takes the GEMM's output tile, the plain split-K sum and the adapters' preparation fixed blocks of their own
(``split_sum.py``, ``prepare.py``). Configs are picked by shape
heuristics, not autotuned: no autotune trial can run a kernel twice into an accumulated gradient, and CPU runs
(the interpreter) see the same choice as the GPU. Benchmarks, tests and the environment override the choices
made here through ``forcing.py``.

Each table is keyed by architecture ("sm90" / "sm80", see ``arch_of``), token regime (decode: M ≤ 16,
prefill: larger), input width (16-bit or fp32) and the rank tile ``BLOCK_R = max(16, next_pow2(R))``, which
sets the size of the second accumulator ``t [BLOCK_M, BLOCK_R]`` and hence register pressure. Tiles shrink
as ``BLOCK_R`` grows so that every entry compiles with zero register spills for its architecture, with
triton 3.6 and 3.9 (``compile_check.py``; docs/design.md §7). fp32 uses small tiles: exact-IEEE dots run on CUDA
cores and hold their operands in registers.

**Strategy** (docs/design.md §3), per (arch, regime, width, BLOCK_R) in ``_STRATEGY``:

- ``one_pass``: the GEMM's K loop also accumulates ``t = a·down`` (the a tile loaded once, two dots). Extra
  tensor-core work ``BLOCK_R / BLOCK_N`` of the base GEMM, and the ``t`` accumulator is live through the loop
  (why the one-pass tiles narrow as R grows: 128x128 at BLOCK_R = 64 on sm_90 is already 50 % extra MMA).
- ``two_pass`` (LoRAFusion's): the shrink kernel writes ``t`` (fp32 ``[M, R]``) first; the GEMM runs a plain
  K loop and then adds ``(t ⊙ rscale)·up``, loading ``t`` 16 ranks at a time (``rank_chunk``). Extra cost: one
  more read of ``a`` and a launch; the GEMM keeps its widest tiles at every rank, one config for all ranks.

**The default table is an estimate, not a measurement** (no GPU has timed either strategy yet): two-pass from
``BLOCK_R = 32`` up in the 16-bit prefill regime, docs/design.md §7's estimate (one-pass's extra MMA is 12.5 % at
R = 32 with 256-wide tiles, 50 % at R = 64 (128-wide) and 200 % at R = 128 (64-wide), against one extra
read of x, ~6 % of the GEMM's time at M = 8192, K = N = 4096); one-pass at BLOCK_R = 16 and everywhere in
decode (a stream over W, where a second launch costs as much as the GEMM); two-pass for fp32 prefill
(32-wide tiles: one-pass's extra work is BLOCK_R / 32 ≥ 50 %). ``benchmarks/gpu_check.sh`` times both
(providers ``triton-1pass`` / ``triton-2pass``); replace the table with what it measures.

Decode's one-pass is not free, though, when every output tile computes its own ``t`` (``forcing.split_rank()``
"in_tile"): each of the ``N / BLOCK_N`` output tiles (``BLOCK_N`` = 64) recomputes its K slice's ``t``, so an fp32
master ``A`` (read as it is, see ``function.py``) is read ``N / 64`` times, from L2 (it is 0.25-2 MB at K = 4096):
``2·BLOCK_R / BLOCK_N`` bytes of ``A`` per byte of a 16-bit ``W``, 0.5× at BLOCK_R = 16 and 2× at 64; and each
slice's programs read their ``up`` tile (``s·v ⊙ B`` from the fp32 master ``B``) again. Against H100's
~3.3 TB/s HBM and roughly twice that from L2, the first probably hides behind W's read and the second
probably does not (~1.5× W's time at r = 64). Hence the default, ``forcing.split_rank()`` "apart" (``forward.py``,
``RANK_APART``): when a launch sums the split-K partials, ``t`` is computed once per K slice by rank programs of
its own in the GEMM's launch (``A`` read once in all; each reads 32 fp32 ranks per K row, as many bytes as a
base program's 64-wide tile of ``W``) and expanded by the sum launch, which reads ``B`` once; still two
launches. At K = N = 4096 (5 slices at r = 16, 4 at r = 64: ``split_k_for`` counts the rank programs) and M = 1 a
decode forward then reads ~35-36 MB into the SMs (``W``: 33.6 MB; ``A`` and ``B`` 0.26 MB each at r = 16, 1 MB at
r = 64) against ~52 MB (r = 16) and ~107 MB (r = 64) in-tile; at M = 16, with ``x`` re-read per column tile (8 MB)
and the partials' round trip (2.6 MB) in both, ~46-48 MB against ~63-117 MB. The re-reads come from L2 (HBM traffic
is about ``W``'s either way): **this default is an estimate from bytes moved, unmeasured** like the tables above
(``triton-intile`` times the other). If ``triton`` still misses the decode target at r = 64, the next candidates are
wider decode tiles at large ranks and fewer K slices (the partials' round trip).

**Loads** (``tma_for``): 16-bit prefill on Hopper (``TMA_MAJORS``) loads its tiles through TMA descriptors
(the launcher falls back to pointers for an operand TMA cannot describe); unmeasured like the strategy table,
timed against pointer loads by the ``triton-ptr`` provider.

**Unaligned widths** (``is_aligned``): the tables assume what the JIT specialises on for widths that are
multiples of 16 (LLM projections): 16-divisible sizes and strides, hence vectorised loads. Otherwise a 16-bit
launch takes the ``-unaligned`` tiles (``_FUSED_UNALIGNED``: narrower, shallower K steps, pointer loads; and
``_SHRINK_UNALIGNED``), which compile without spills with no divisibility hints at all; the tables' tiles
spilled up to ~5 KB there.

**Split-K at decode** (docs/design.md §7): with M ≤ 16 the GEMM has only ``cdiv(N, BLOCK_N)`` output tiles (64
on a 4096-wide layer against 132 SMs). ``split_k_for`` splits K until about ``target_programs`` programs run
(at least ``_MIN_K_STEPS`` K steps each); the fp32 partials are summed afterwards in a fixed order, so the
result is deterministic: by a second launch (the default; one-pass: with the rank-R term apart, above) or, with
``forcing.split_reduce() == "kernel"``, by the last of each output tile's slices to finish, in the GEMM's own launch
(in-tile, and bit for bit the in-tile launch's result, a launch fewer; unmeasured, like the tables). Split-K is
used by the 16-bit decode configs only (forced values too; fp32's 32-wide decode tiles already launch 128
programs on a 4096-wide layer).

**Adapter dropout** (``dropout.py``) runs two-pass whatever the table or forcing says (the shrink draws the
mask); its launches get their own tiles where the usual ones spill: ``_SHRINK_DROPOUT`` for the shrink that
draws the mask, ``_FUSED_DROPOUT`` for dx's GEMM, which holds a second accumulator (``launches`` says which
configs a launch with and without dropout can get).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "MAX_RANK",
    "BLOCK_RS",
    "DECODE_MAX_M",
    "STRATEGIES",
    "TMA_MAJORS",
    "SPLIT_REDUCES",
    "DEFAULT_SPLIT_REDUCE",
    "SPLIT_RANKS",
    "DEFAULT_SPLIT_RANK",
    "FusedConfig",
    "ShrinkConfig",
    "RankGradConfig",
    "block_r_for",
    "regime_of",
    "strategy_for",
    "table_strategy",
    "fused_config",
    "is_aligned",
    "split_k_for",
    "tma_for",
    "shrink_config",
    "rank_grad_config",
    "all_fused_configs",
    "all_shrink_configs",
    "all_rank_grad_configs",
    "launches",
    "arch_of",
    "table_for_major",
    "ARCHS",
    "SHARED_MEMORY_LIMIT",
]

INT32_MAX = 2**31 - 1

MAX_RANK = 128
"""Largest rank the triton kernels support (the torch backend has no limit)."""


def check_supported_rank(rank: int) -> None:
    """A clear error for a rank above ``MAX_RANK`` (where a layer or config asks for the triton backend, and at
    its forward)."""
    if rank > MAX_RANK:
        from tied_lora_kernels.functional import shown  # (a cold path: configs imports torch only)

        raise ValueError(
            f"backend='triton' supports ranks up to {MAX_RANK}, got rank {shown(rank)}; use backend='torch' "
            "(or 'auto', which runs the torch path above it)"
        )


BLOCK_RS = (16, 32, 64, 128)
"""Every rank tile a launch can use: ranks are padded up to the next of these."""

DECODE_MAX_M = 16
"""Up to this many tokens a launch uses the decode tiles (a read of W, M padded to 16)."""

STRATEGIES = ("one_pass", "two_pass")
TMA_MAJORS = (9,)
"""Compute-capability majors whose 16-bit prefill loads through TMA: Hopper. Datacenter Blackwell has TMA too,
but triton 3.6 lacks the driver workaround 3.9 carries for small non-dense tensors (the padded ``s·v ⊙ B``
view is one), and nothing has been measured there."""
SPLIT_REDUCES = ("launch", "kernel")
DEFAULT_SPLIT_REDUCE = "launch"
"""Split-K partials are summed by a second launch unless forced: the in-kernel sum is unmeasured
(``forcing.split_reduce``)."""
SPLIT_RANKS = ("apart", "in_tile")
DEFAULT_SPLIT_RANK = "apart"
"""One-pass split-K summed by a launch computes ``t`` apart unless forced: estimated from bytes moved
(``forcing.split_rank``)."""


@dataclass(frozen=True)
class FusedConfig:
    """Tiles of the fused GEMM ``out = a·w + ((a·down) ⊙ rscale)·up (+ bias)``: out tile ``BLOCK_M × BLOCK_N``.

    ``strategy``: "one_pass" (t accumulated in the K loop, ``BLOCK_R`` = the padded rank) or "two_pass" (t
    loaded from the shrink kernel, added ``rank_chunk`` ranks at a time: one config serves every rank);
    ``split_k``: the config may split K (the 16-bit decode configs, ``split_k_for``); ``aligned``: False for
    the tiles of 16-bit launches whose widths are not multiples of 16 (``fused_config``)."""

    name: str
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    strategy: str = "one_pass"
    rank_chunk: int = 0
    split_k: bool = False
    aligned: bool = True


@dataclass(frozen=True)
class ShrinkConfig:
    """Tiles of the shrink ``t [M, R] = a [M, K]·down [K, R]`` (fp32 out): ``BLOCK_M`` rows per program."""

    name: str
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int
    aligned: bool = True


@dataclass(frozen=True)
class RankGradConfig:
    """Tiles of ``out [C, R] = Σ_m a[m, c] · p[m, r]``: ``BLOCK_C`` rows per program, ``BLOCK_M`` tokens per step."""

    name: str
    block_c: int
    block_m: int
    num_warps: int
    num_stages: int


# (arch, regime, is 32-bit, BLOCK_R, strategy) -> config. arch "sm90": Hopper and newer; "sm80": Ampere/Ada,
# whose mma.sync accumulators need more registers and whose shared memory can be 99 KB (sm_86/sm_89).
_FUSED: dict[tuple[str, str, bool, int, str], FusedConfig] = {}
_FUSED_UNALIGNED: dict[tuple[str, str, bool, int, str], FusedConfig] = {}
ARCHS = ("sm90", "sm80")
REGIMES = ("decode", "prefill")
SHARED_MEMORY_LIMIT = {"sm90": 232448, "sm80": 101376}
"""Bytes of shared memory one program may use: H100 (227 KB), and the smallest of sm_80/86/89 (99 KB)."""


def _add_fused(arch, regime, wide, block_rs, bm, bn, bk, warps, stages, group_m=8, two_pass=False, aligned=True):
    family = f"{arch}-{regime}-{'fp32' if wide else '16bit'}"
    split_k = regime == "decode" and not wide
    table, suffix = (_FUSED, "") if aligned else (_FUSED_UNALIGNED, "-unaligned")
    tiles = (bm, bn, bk, group_m, warps, stages)
    if two_pass:  # one config for every rank: the rank-R term walks the rank in chunks of 16 (32 spills on sm_90)
        cfg = FusedConfig(f"{family}-2pass{suffix}", *tiles, "two_pass", 16, split_k, aligned)
        for br in block_rs:
            table[(arch, regime, wide, br, "two_pass")] = cfg
        return
    for br in block_rs:
        cfg = FusedConfig(f"{family}-r{br}{suffix}", *tiles, "one_pass", 0, split_k, aligned)
        table[(arch, regime, wide, br, "one_pass")] = cfg


for _arch in ARCHS:
    for _two_pass in (False, True):
        # decode, M <= 16: a stream over W (split over K, see split_k_for); 16 rows: the smallest MMA tile. sm_80's
        # one-pass at R = 128 with two stages: the forward of an odd rank (B's rows unaligned) with the in-kernel
        # split-K sum sat at 255 registers with three and spilled 8 bytes for sm_120 (triton 3.9) once dx's dropout
        # arguments came
        _ranks = (16, 32, 64) if (_arch, _two_pass) == ("sm80", False) else BLOCK_RS
        _add_fused(_arch, "decode", False, _ranks, 16, 64, 64, 4, 3, two_pass=_two_pass)
        if _ranks != BLOCK_RS:
            _add_fused(_arch, "decode", False, (128,), 16, 64, 64, 4, 2)
        # fp32 runs exact-IEEE dots on CUDA cores unless TF32 is allowed: small tiles, 8 warps (4 spill at
        # R = 128 on sm_80), one config for every M; 32-wide tiles already give 128 programs on a 4096-wide
        # layer at decode, so no split-K
        for _regime in REGIMES:
            _add_fused(_arch, _regime, True, BLOCK_RS, 32, 32, 32, 8, 2, two_pass=_two_pass)
# fp32 one-pass at R = 16, 64 and 128: 16-long K steps and 8 warps. At R = 16, 32-long steps spilled 8-28 bytes at
# 64 registers on triton 3.7.1 (dx, sm_100) and 3.8 (the forward without u and v, LoRA's layer: sm_90, sm_80);
# 16-long ones compile clean on triton 3.6, 3.7.1, 3.8 and 3.9 for every set of the switches, with --full. R = 32
# keeps the 32-long steps above: 16-long ones spilled 8 bytes in dx without u (sm_100, triton 3.7.1). At R = 64,
# 32-long steps spilled with 4 warps on triton 3.6 in a layer without u (200-308 bytes at 255 registers: sm_90 and
# sm_100; the LoRA preset) and with 8 under triton 3.9's ptxas options (32-48 bytes at 80 registers, sm_90 and
# sm_120); 16-long ones compile clean on both for every set of the bias, u and v switches. At R = 128, 32-long
# steps spilled under triton 3.9's options on sm_80 (8 bytes in dx with two stages, 1,284 bytes in dx without u
# with one, ~500 bytes in the forward with 4 warps; 16 bytes with TF32 for sm_100). At R = 128 triton 3.6 spilled
# 136-192 bytes without u with every tile tried (16 or 32 rows, 16- or 32-long K steps, 4 or 8 warps, 1 or 2
# stages) until the exact-fp32 epilogue ran as two 64-rank dots (in rank_terms._add_rank_update)
for _regime in REGIMES:
    for _arch in ARCHS:
        _add_fused(_arch, _regime, True, (16, 64, 128), 32, 32, 16, 8, 2)
# one-pass prefill / training, M > 16. docs/design.md §7: 128x256x64, 8 warps at small ranks on sm_90; narrower as
# R grows (the t accumulator is live through the K loop)
_add_fused("sm90", "prefill", False, (16, 32), 128, 256, 64, 8, 3)
_add_fused("sm90", "prefill", False, (64,), 128, 128, 64, 8, 3)
_add_fused("sm90", "prefill", False, (128,), 128, 64, 32, 8, 3)  # (128x128 spills 40-48 bytes, triton 3.9)
_add_fused("sm80", "prefill", False, (16, 32, 64), 128, 128, 32, 8, 3)
_add_fused("sm80", "prefill", False, (128,), 128, 64, 32, 8, 3)
# two-pass prefill: no t in the K loop, so the widest tiles at every rank
_add_fused("sm90", "prefill", False, BLOCK_RS, 128, 256, 64, 8, 3, two_pass=True)
_add_fused("sm80", "prefill", False, BLOCK_RS, 128, 128, 32, 8, 3, two_pass=True)

# 16-bit launches whose widths (N, K or a's row stride) are not multiples of 16: the JIT then drops its
# divisibility hints, loads lose their vector width and the tiles above spill up to ~5 KB (triton 3.6, sm_90);
# these compile without spills unhinted on triton 3.6 and 3.9 (compile_check's "-unaligned" variants)
for _arch in ARCHS:
    for _two_pass in (False, True):
        # (under triton 3.9's ptxas options sm_90's split-K forward at R = 16 spilled 8 bytes with 2 stages (in-kernel
        # sum, sm_100), 3 (without v) and 4 (without a bias or u), not with 1; sm_80's with 2 and 3 (sm_120))
        _stages = 1 if _arch == "sm90" else 4
        _add_fused(_arch, "decode", False, BLOCK_RS, 16, 64, 32, 4, _stages, two_pass=_two_pass, aligned=False)
    _add_fused(_arch, "prefill", False, (16, 32), 128, 64, 32, 8, 3, aligned=False)
    # (sm_80's at R = 64 takes 16-long K steps: with 32, dx sat at 255 registers and spilled 8 bytes for sm_120
    # under triton 3.7.1 in a layer without a bias, u or v; with 16 it needs ~160)
    _add_fused(_arch, "prefill", False, (64,), 64, 64, 16 if _arch == "sm80" else 32, 8, 3, aligned=False)
    _add_fused(_arch, "prefill", False, (128,), 64, 64, 32, 8, 3, aligned=False)
    _add_fused(_arch, "prefill", False, BLOCK_RS, 128, 64, 32, 8, 3, two_pass=True, aligned=False)

# two-pass dx with adapter dropout (forward.py, DROPOUT): the rank-R term is summed apart from the GEMM's
# accumulator, a second [BLOCK_M, BLOCK_N] fp32 tile; sm_90's 128x256 two-pass tiles spilled 0.8-2.8 KB with it
# (sm_80's 128x128 do not). Aligned widths only: the unaligned tiles are small enough as they are.
_FUSED_DROPOUT: dict[tuple[str, str, bool, int, str], FusedConfig] = {
    ("sm90", "prefill", False, _br, "two_pass"): FusedConfig(
        "sm90-prefill-16bit-2pass-dropout", 128, 128, 64, 8, 8, 3, "two_pass", 16
    )
    for _br in BLOCK_RS
}

# (arch, regime, is 32-bit, BLOCK_R) -> strategy: the default, UNMEASURED (see the module docstring)
_STRATEGY: dict[tuple[str, str, bool, int], str] = {}
for _arch in ARCHS:
    for _br in BLOCK_RS:
        _STRATEGY[(_arch, "decode", False, _br)] = "one_pass"
        _STRATEGY[(_arch, "decode", True, _br)] = "one_pass"
        _STRATEGY[(_arch, "prefill", False, _br)] = "one_pass" if _br < 32 else "two_pass"
        _STRATEGY[(_arch, "prefill", True, _br)] = "two_pass"

# (arch, is 32-bit, BLOCK_R) -> shrink config. A read of a (x or dy) with a tiny rank-wide output: 64-row
# tiles, K steps as long as shared memory allows at large ranks; on sm_80 at R = 128 shorter K steps (16-bit)
# and no pipelining (fp32), which used 244-255 registers otherwise. 16-bit with 8 warps at R = 16, and on sm_80 at
# R = 64: with 4, triton 3.9's ptxas options spilled 8 bytes at R = 16 (sm_100, sm_120) and 32 at R = 64 (sm_120);
# 4 elsewhere: with 8, triton 3.6 serialized sm_90's wgmma at R = 32 (ptxas C7515)
_SHRINK: dict[tuple[str, bool, int], ShrinkConfig] = {}
for _arch in ARCHS:
    for _br in BLOCK_RS:
        _big = _arch == "sm80" and _br == 128
        _warps = 8 if _br == 16 or (_arch, _br) == ("sm80", 64) else 4
        _SHRINK[(_arch, False, _br)] = ShrinkConfig(
            f"{_arch}-shrink-16bit-r{_br}", 64, 128 if _br <= 32 else (32 if _big else 64), _warps, 3
        )
        _SHRINK[(_arch, True, _br)] = ShrinkConfig(f"{_arch}-shrink-fp32-r{_br}", 32, 32, 4, 1 if _big else 2)

# 16-bit shrinks of an ``a`` whose K or row stride is not a multiple of 16 (``is_aligned``): the tiles above
# spilled up to ~2 KB unhinted (triton 3.6); these compile without spills with no divisibility hints at all. 8 warps
# at R = 32: with 4, the dropout shrink (which these serve too) spilled 8-16 bytes at 168 registers for sm_100 on
# triton 3.7.1 and 3.8 (clean with 8 on 3.6-3.9, every switch, --full; one stage also clean but unpipelined)
_SHRINK_UNALIGNED: dict[tuple[str, bool, int], ShrinkConfig] = {
    (_arch, False, _br): ShrinkConfig(
        f"{_arch}-shrink-16bit-r{_br}-unaligned", 64, 32, 8 if _br in (32, 128) else 4, 2, aligned=False
    )
    for _arch in ARCHS
    for _br in BLOCK_RS
}

# shrinks that draw the dropout mask (shrink.py, DROPOUT): Philox's state for a [BLOCK_M, BLOCK_K] tile lives
# in registers, so shorter K steps and 8 warps (with the tiles above, 9 rows on triton 3.6 and 7 on 3.9 spill
# 12 B-1.6 KB). The unaligned tiles (32-long K steps) draw it without spilling and serve unaligned dropout launches.
_SHRINK_DROPOUT: dict[tuple[str, bool, int], ShrinkConfig] = {}
for _arch in ARCHS:
    for _br in BLOCK_RS:
        _SHRINK_DROPOUT[(_arch, False, _br)] = ShrinkConfig(f"{_arch}-shrink-16bit-r{_br}-dropout", 64, 32, 8, 3)
        _SHRINK_DROPOUT[(_arch, True, _br)] = ShrinkConfig(  # (two stages spilled at R = 128)
            f"{_arch}-shrink-fp32-r{_br}-dropout", 32, 32, 8, 1 if _br == 128 else 2
        )

MAX_BLOCK_K = max(c.block_k for t in (_FUSED, _FUSED_UNALIGNED, _FUSED_DROPOUT, _SHRINK, _SHRINK_UNALIGNED,
                                        _SHRINK_DROPOUT) for c in t.values())  # fmt: skip
"""The longest K step of any fused-GEMM or shrink config (``narrow_k_steps``)."""

# (arch, is 32-bit, BLOCK_R) -> config
_RANK_GRAD: dict[tuple[str, bool, int], RankGradConfig] = {}
for _arch in ARCHS:
    for _br in BLOCK_RS:
        _RANK_GRAD[(_arch, False, _br)] = RankGradConfig(
            f"{_arch}-rankgrad-16bit-r{_br}", 128 if _br <= 32 else 64, 64, 8 if _br == 128 else 4, 3
        )
        # fp32: 8 warps from R = 32 up (with 4, ptxas spilled 20-28 bytes at 96 registers on sm_80, and 8 bytes
        # at R = 32 for sm_100 under triton 3.9's options); 3 stages on sm_80 at R = 128 (2 spilled 8 bytes for
        # sm_120); 1 stage on sm90 at R = 128 (with 2, G spilled 8 bytes at 80 registers with TF32 for sm_90 under
        # triton 3.7.1; 32-token steps instead spilled 8 bytes for sm_100 under 3.8 in a layer without u)
        _warps = 8 if _br >= 32 else 4
        _stages = {("sm80", 128): 3, ("sm90", 128): 1}.get((_arch, _br), 2)
        _RANK_GRAD[(_arch, True, _br)] = RankGradConfig(
            f"{_arch}-rankgrad-fp32-r{_br}", 64 if _br <= 32 else 32, 16, _warps, _stages
        )

_INTERPRETER_SMS = 132
"""The SM count assumed off a GPU (the interpreter's CPU tensors): an H100 SXM's, as the sm90 table."""

_MIN_K_STEPS = 4
"""A split-K program runs at least this many ``BLOCK_K`` steps (below that its prologue dominates)."""


def arch_of(device: torch.device) -> str:
    """The config table for ``device``: "sm90" on Hopper and datacenter Blackwell (227 KB shared memory) and
    under the interpreter, "sm80" elsewhere (Ampere, Ada and consumer Blackwell have 99-163 KB)."""
    if device.type != "cuda":
        return "sm90"
    return table_for_major(_capability(device)[0])


def table_for_major(major: int) -> str:
    """The config table of a compute-capability major: "sm90" for 9 and 10, "sm80" otherwise."""
    return "sm90" if major in (9, 10) else "sm80"


def target_programs(device: torch.device) -> int:
    """How many programs a launch split for parallelism aims at: about two waves, twice the GPU's SM count
    (264 on an H100 SXM or H200, 228 on an H100 PCIe, 216 on an A100; 264 off a GPU). Split-K at decode and
    the token split of the rank gradients' reduction (``backward.rank_grad``) size themselves by it."""
    if device.type != "cuda":
        return 2 * _INTERPRETER_SMS
    return 2 * _cuda_sm_count(_index(device))


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _capability(device: torch.device) -> tuple[int, int]:
    return _cuda_capability(_index(device))


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    # cached: a launch asks for its table several times, and a decode GEMM lasts microseconds
    major, minor = torch.cuda.get_device_capability(index)
    if major == 9:  # before the first kernel is compiled for Hopper (also for launches that skip the dispatcher)
        from . import hopper_ptxas

        problem = hopper_ptxas()
        if problem is not None:
            raise RuntimeError(f"the triton kernels cannot run on cuda:{index}: {problem}")
    return major, minor


def block_r_for(rank: int) -> int:
    """The padded rank tile ``max(16, next_pow2(rank))`` (tensor-core dots need at least 16)."""
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank must be in [1, {MAX_RANK}] for the triton kernels, got {rank}")
    return _BLOCK_R_OF[rank]


_BLOCK_R_OF = (0, *(next(br for br in BLOCK_RS if br >= rank) for rank in range(1, MAX_RANK + 1)))
"""``block_r_for`` by rank: a tuple index, where the search it holds cost ~0.5 µs per launch."""


def _is_wide(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


def regime_of(M: int) -> str:
    """ "decode" for ``M ≤ DECODE_MAX_M`` tokens, else "prefill"."""
    return "decode" if M <= DECODE_MAX_M else "prefill"


def _check_choice(value: str | None, choices: tuple[str, ...], what: str) -> str | None:
    """``value`` when it is one of ``choices``, None for "auto" or unset (the default decides), else an error naming
    ``what`` (an argument or an environment variable): ``strategy_for``'s ``forced`` and everything ``forcing.py``
    is given."""
    if value in (None, "", "auto"):
        return None
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices} or 'auto', got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------
# the choices a launch makes


def strategy_for(M: int, block_r: int, dtype: torch.dtype, device: torch.device, forced: str | None = None) -> str:
    """ "one_pass" or "two_pass" for ``M`` rows: ``forced`` if given, else the (unmeasured) default table."""
    if forced is not None:
        return _check_choice(forced, STRATEGIES, "strategy") or strategy_for(M, block_r, dtype, device)
    return table_strategy(arch_of(device), M, block_r, _is_wide(dtype))


def table_strategy(arch: str, M: int, block_r: int, wide: bool) -> str:
    """The default strategy of table ``arch`` ("sm90" / "sm80") for ``M`` rows, rank tile and input width."""
    return _STRATEGY[(arch, regime_of(M), wide, block_r)]


def fused_config(
    M: int,
    block_r: int,
    dtype: torch.dtype,
    device: torch.device,
    strategy: str = "one_pass",
    aligned: bool = True,
    *,
    dropout: bool = False,
) -> FusedConfig:
    """The fused-GEMM tiles for ``M`` output rows, rank tile ``block_r``, input dtype, device and strategy;
    ``aligned=False`` (16-bit only, see ``is_aligned``) gives the smaller tiles that compile without spills
    when the JIT cannot assume 16-divisible widths; ``dropout`` (two-pass dx with adapter dropout, which holds
    a second accumulator) the tiles of ``_FUSED_DROPOUT`` where the two-pass ones would spill."""
    key = (arch_of(device), regime_of(M), _is_wide(dtype), block_r, strategy)
    if dropout and aligned and key in _FUSED_DROPOUT:
        return _FUSED_DROPOUT[key]
    return _FUSED[key] if aligned or key not in _FUSED_UNALIGNED else _FUSED_UNALIGNED[key]


def is_aligned(a: Tensor, N: int = 0) -> bool:
    """Whether a fused-GEMM (or shrink) launch on ``a [M, K]`` with ``N`` output columns gets the divisibility the
    compiled tables assume: ``N``, ``K`` and ``a``'s row stride multiples of 16, ``a`` unit-stride along K and
    16-byte aligned (``w``, ``down`` and ``up`` are the layer's contiguous weights or the launcher's padded
    copies)."""
    K = a.shape[1]
    stride_m, stride_k = a.stride()  # (one call: ``stride(dim)`` is a dispatched op, twice the cost)
    widths = N % 16 == 0 and K % 16 == 0 and stride_m % 16 == 0 and stride_k == 1
    return widths and a.data_ptr() % 16 == 0  # (a view at an odd offset loses the pointer's hint)


def narrow_k_steps(t: Tensor, k_dim: int = 1) -> Tensor:
    """A fused-GEMM or shrink operand itself (``a [M, K]``, ``k_dim=1``; ``w [K, N]``, ``k_dim=0``), or a
    contiguous copy when a K step of it would wrap in int32: the kernels form ``offs_k · stride`` and ``BLOCK_K ·
    stride`` along K in int32 (their row and column offsets are int64) whenever triton passes the stride as an
    int32 (below 2³¹), so a stride along K of 2³¹ / ``MAX_BLOCK_K`` or more (a column-major ``x`` or ``dy`` of
    2²⁴ rows) would read the wrong elements. Row-major inputs and strides passed as int64 are left as they are."""
    stride = t.stride()[k_dim]  # (not ``stride(k_dim)``, a dispatched op: see is_aligned)
    return t.contiguous() if stride * MAX_BLOCK_K > INT32_MAX >= stride else t


GRID_Y_MAX = 65535
"""CUDA's limit on a grid's second dimension, the fused GEMM's K slices (a forced ``split_k`` is capped at it)."""


def split_k_for(
    M: int,
    N: int,
    K: int,
    cfg: FusedConfig,
    device: torch.device,
    forced: int | None = None,
    rank_programs: int = 0,
) -> int:
    """How many K slices the fused GEMM splits into: 1 unless ``cfg.split_k`` (16-bit decode); else ``forced`` or
    enough slices for ~``target_programs(device)`` programs, each at least ``_MIN_K_STEPS`` K steps long, counting
    per slice the output tiles and ``rank_programs`` (the rank-apart launch's, which stream as many bytes per K step
    as an output tile's). The launcher rounds the slice length up to whole ``BLOCK_K`` steps, so it may launch fewer
    slices than this."""
    if not cfg.split_k:
        return 1
    if forced is not None:
        return max(1, min(forced, GRID_Y_MAX))
    per_slice = -(-M // cfg.block_m) * -(-N // cfg.block_n) + rank_programs
    want = -(-target_programs(device) // per_slice)
    most = max(1, K // (cfg.block_k * _MIN_K_STEPS))
    return max(1, min(want, most))


def tma_for(M: int, dtype: torch.dtype, device: torch.device, split: int, forced: bool | None = None) -> bool:
    """Whether the fused GEMM loads its tiles through TMA descriptors (the launcher also needs the operands
    16-byte aligned with a unit-stride dim, else it uses pointers): only 16-bit prefill (M > 16) without split-K
    on a GPU of ``TMA_MAJORS`` or under the interpreter (CPU tensors: it reads descriptors, so the CPU tests cover
    the path) can; there ``forced`` if given, else the default, UNMEASURED like the strategy table: on (Triton's
    Hopper GEMMs run faster with TMA). Decode never does, forced or not: the compile check compiles TMA variants of
    the prefill configs only."""
    has_tma = device.type != "cuda" or _capability(device)[0] in TMA_MAJORS
    possible = not _is_wide(dtype) and split == 1 and has_tma and regime_of(M) == "prefill"
    return possible if forced is None else forced and possible


def shrink_config(
    block_r: int, dtype: torch.dtype, device: torch.device, aligned: bool = True, *, dropout: bool = False
) -> ShrinkConfig:
    """The shrink tiles for rank tile ``block_r``, input dtype and device (``aligned=False``: see ``is_aligned``;
    ``dropout``: a shrink drawing the dropout mask, ``_SHRINK_DROPOUT``'s tiles unless a 16-bit launch is
    unaligned; fp32 has no unaligned tiles, its small ones compile without spills either way)."""
    key = (arch_of(device), _is_wide(dtype), block_r)
    if not aligned and key in _SHRINK_UNALIGNED:
        return _SHRINK_UNALIGNED[key]
    return _SHRINK_DROPOUT[key] if dropout else _SHRINK[key]


def rank_grad_config(block_r: int, dtype: torch.dtype, device: torch.device) -> RankGradConfig:
    """The rank-gradient reduction tiles for rank tile ``block_r``, input dtype and device."""
    return _RANK_GRAD[(arch_of(device), _is_wide(dtype), block_r)]


def all_fused_configs() -> list[tuple[str, FusedConfig, int, bool]]:
    """Every ``(arch, config, BLOCK_R, is_fp32)`` that ``fused_config`` can return (both strategies; a two-pass
    config once, with its rank chunk as ``BLOCK_R``; the dropout tiles too)."""
    out: dict[str, tuple[str, FusedConfig, int, bool]] = {}
    for (arch, _, wide, br, _), cfg in [*_FUSED.items(), *_FUSED_UNALIGNED.items(), *_FUSED_DROPOUT.items()]:
        out.setdefault(cfg.name, (arch, cfg, cfg.rank_chunk or br, wide))
    return list(out.values())


def all_shrink_configs() -> list[tuple[str, ShrinkConfig, int, bool]]:
    """Every ``(arch, config, BLOCK_R, is_fp32)`` that ``shrink_config`` can return (the dropout tiles too)."""
    tables = [*_SHRINK.items(), *_SHRINK_UNALIGNED.items(), *_SHRINK_DROPOUT.items()]
    return [(arch, cfg, br, wide) for (arch, wide, br), cfg in tables]


def launches(cfg: FusedConfig | ShrinkConfig, *, dropout: bool) -> bool:
    """Whether a launch with (``dropout=True``) or without adapter dropout can get ``cfg`` from ``fused_config``
    or ``shrink_config``: the dropout tables serve dropout launches only and replace the aligned two-pass and
    shrink tiles there; one-pass tiles never launch with dropout. (What the compile check compiles.)"""
    if isinstance(cfg, FusedConfig):
        if cfg in _FUSED_DROPOUT.values():
            return dropout
        if not dropout or cfg.strategy != "two_pass":
            return not dropout
        aligned_keys = [key for key, c in _FUSED.items() if c == cfg]
        return not cfg.aligned or any(key not in _FUSED_DROPOUT for key in aligned_keys)
    if cfg in _SHRINK_DROPOUT.values():
        return dropout
    return not dropout or not cfg.aligned


def all_rank_grad_configs() -> list[tuple[str, RankGradConfig, int, bool]]:
    """Every ``(arch, config, BLOCK_R, is_fp32)`` that ``rank_grad_config`` can return."""
    return [(arch, cfg, br, wide) for (arch, wide, br), cfg in _RANK_GRAD.items()]
