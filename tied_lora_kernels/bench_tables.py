"""The benchmark report's tables, from the records ``bench.load`` flattens (one per benchmark: its ``extra_info`` and
statistics): per shape and mode each provider's time, throughput and ratio to ``nn.Linear`` (the floor), the
end-to-end and eager tables, the summary, the memory kept for backward, issue 3's speed targets (``target_rows``)
and what the forced-choice providers say about the defaults in ``configs.py`` (``choice_rows``).
``bench.py`` runs the suite, reads its JSON and prints or writes these.
"""

from __future__ import annotations

import math
from collections import defaultdict

from .kernels import configs
from .kernels.configs import DECODE_MAX_M

__all__ = ["summary_rows", "target_rows", "choice_rows", "plan_rows"]

FLOOR = "nn.Linear"
ORDER = (
    FLOOR, "torch", "torch.compile", "triton", "triton-1pass", "triton-2pass", "triton-ptr", "triton-1launch",
    "triton-intile", "triton-host", "peft-lora", "peft-vera", "triton-dropout", "peft-lora-dropout",
)  # fmt: skip
MODES = ("forward", "backward", "fwd+bwd")
# issue 3's speed targets (H100, bf16, K = N = 4096, its ranks TARGET_RANKS): at M = TARGET_M, forward and forward
# + backward against nn.Linear, the torch path's time over ours (at least), and the worst decode forward (M <= 16)
TARGET_M = 8192
TARGET_K = 4096  # (= N)
TARGET_RANKS = (8, 16, 64)
TARGETS = (
    ("forward / nn.Linear", 1.05, "<="),
    ("fwd+bwd / nn.Linear", 1.15, "<="),
    ("torch / ours, fwd+bwd", 1.3, ">="),
    ("decode fwd / nn.Linear, CUDA graph", 1.05, "<="),  # (eager decode: the eager table)
)


def _floor_times(records, stat) -> dict:
    """nn.Linear's time per case of each run (``_case``), leaving out a decode floor timed eagerly after its graph
    capture failed: every ratio to it would read faster than it is (the others' decodes are graphs), so its cases
    have none."""
    return {
        _case(r): r[stat] for r in records if r.get("kind") == "linear" and r["provider"] == FLOOR and not _fell_back(r)
    }


def _case(r) -> tuple:
    """A benchmark case of one run: a ratio divides times of one process only (issue 3: "measured in one
    process"), so reports read from several runs' JSON (a run and a partial rerun) never mix their floors."""
    return (r.get("datetime"), r["device_name"], r["dtype"], r["shape"], r["mode"], r["M"])


def _fell_back(r) -> bool:
    """Whether a decode meant for a CUDA graph was timed eagerly, its capture having failed (``timing.run``)."""
    return str(r.get("timing", "")).startswith("cuda-events (graph capture failed")


def _fallback_notes(records) -> list[str]:
    return [f"{r['name']} was timed without a CUDA graph: {r['timing']}" for r in records if _fell_back(r)]


def _ratio(r, floors, stat) -> float | None:
    """Time / time of nn.Linear: against the floor timed round by round beside it when there is one (CPU runs,
    robust to a busy machine, and CUDA's eager rounds, robust to drifting clocks), else against the floor's own
    benchmark of the same run."""
    paired = r.get("paired_floor")
    if paired and paired.get(stat):
        return r[stat] / paired[stat]
    floor = floors.get(_case(r))
    return r[stat] / floor if floor else None


def _provider_key(p: str):
    return (ORDER.index(p) if p in ORDER else len(ORDER), p)


def _geomean(xs) -> float | None:
    xs = [x for x in xs if x]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


# ---------------------------------------------------------------------------------------------------------
# tables


def _shape_tables(records, stat):
    floors = _floor_times(records, stat)
    groups = defaultdict(list)
    for r in records:
        if r.get("kind") == "linear":
            groups[(r["device_name"], r["dtype"], r["shape"], r["K"], r["N"], r["mode"])].append(r)
    headers = ["M", "provider", "rank", f"time ({stat})", "TFLOP/s", "GB/s", "x nn.Linear", "saved MiB", "peak MiB"]
    for (dev, dtype, shape, K, N, mode), rs in sorted(groups.items(), key=lambda kv: _group_sort(kv[0])):
        rs.sort(key=lambda r: (r["M"], r["rank"], _provider_key(r["provider"])))
        rows = [
            [
                r["M"],
                r["provider"],
                r["rank"] or "-",
                _fmt_time(r[stat]),
                _fmt(r["flops"] / r[stat] / 1e12, 3),
                _fmt(r["bytes"] / r[stat] / 1e9, 3),
                _fmt(_ratio(r, floors, stat), 3),
                _mib(r.get("saved_bytes")),
                _mib(r.get("peak_bytes")),
            ]
            for r in rs
        ]
        yield f"{shape} [K={K}, N={N}] {dtype} {mode} on {dev}", headers, rows
    e2e = [r for r in records if r.get("kind") == "e2e"]
    if e2e:
        yield from _e2e_tables(e2e, stat)
    yield from _eager_tables(records, stat)


def _group_sort(key):
    dev, dtype, shape, K, N, mode = key
    return (dev, dtype, shape, MODES.index(mode) if mode in MODES else 9)


def _e2e_tables(e2e, stat):
    groups = defaultdict(list)
    for r in e2e:
        groups[(r["device_name"], r["dtype"], r["shape"], r["tokens"])].append(r)
    headers = ["provider", "rank", f"step ({stat})", "tokens/s", "x peft-lora", "trainable", "saved MiB", "peak MiB"]
    for (dev, dtype, shape, tokens), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["provider"])
        lora = next((r[stat] for r in rs if r["provider"] == "peft-lora"), None)

        def vs_lora(r, lora=lora):  # against PEFT LoRA timed round by round beside it (CPU runs)
            ref = r.get("paired_reference_s")
            return r[stat] / ref[stat] if ref and ref.get(stat) else (r[stat] / lora if lora else None)

        rows = [
            [
                r["provider"],
                r["rank"],
                _fmt_time(r[stat]),
                f"{tokens / r[stat]:,.0f}",
                _fmt(vs_lora(r), 3),
                f"{r['trainable_params']:,}",
                _mib(r.get("saved_bytes")),
                _mib(r.get("peak_bytes")),
            ]
            for r in rs
        ]
        yield f"end-to-end training step: {shape}, {tokens} tokens, {dtype} on {dev}", headers, rows


def _eager_tables(records, stat):
    """Eager decode (benchmarks/test_bench_eager.py): time per projection of a stack of modules run one token at a
    time without CUDA graphs, and its ratio to nn.Linear's stack. ``triton-host`` (CPU) is the triton backend's
    host path with its launches stubbed: a cost, not a runnable provider, so it gets no ratio."""
    groups = defaultdict(list)
    for r in records:
        if r.get("kind") == "eager":
            groups[(r["device_name"], r["dtype"], r["shape"], r["layers"])].append(r)
    headers = ["provider", "rank", f"per projection ({stat})", "x nn.Linear", "timing"]
    for (dev, dtype, shape, layers), rs in sorted(groups.items()):
        rs.sort(key=lambda r: _provider_key(r["provider"]))
        floor = next((r[stat] for r in rs if r["provider"] == FLOOR), None)
        rows = []
        for r in rs:
            host_only = r["provider"] == "triton-host"
            ratio = None if host_only or not floor else r[stat] / floor
            how = "wall, launches stubbed" if host_only else r.get("timing", "-")
            rows.append([r["provider"], r["rank"] or "-", _fmt_time(r[stat] / layers), _fmt(ratio, 3), how])
        yield f"eager decode: {layers} x {shape} modules, M = 1, {dtype} on {dev} (host time included)", headers, rows


def summary_rows(records, stat="median"):
    """(shape, dtype, rank, mode, M) -> nn.Linear time and each provider's ratio to it."""
    floors = _floor_times(records, stat)
    lin = [r for r in records if r.get("kind") == "linear"]
    provs = sorted({r["provider"] for r in lin if r["provider"] != FLOOR}, key=_provider_key)
    cells = defaultdict(dict)
    shown = {case[1:]: time for case, time in floors.items()}  # (the floor of the last run read, for its column)
    for r in lin:
        if r["provider"] != FLOOR:
            key = (r["device_name"], r["shape"], r["dtype"], r["rank"], r["mode"], r["M"])
            cells[key][r["provider"]] = _ratio(r, floors, stat)
    rows = []
    for key in sorted(cells, key=lambda k: (k[0], k[1], k[2], k[3], MODES.index(k[4]), k[5])):
        dev, shape, dtype, rank, mode, M = key
        floor = shown.get((dev, dtype, shape, mode, M))
        rows.append([shape, dtype, rank, mode, M, _fmt_time(floor)] + [_fmt(cells[key].get(p), 3) for p in provs])
    return ["shape", "dtype", "rank", "mode", "M", "nn.Linear"] + [f"x {p}" for p in provs], rows, provs


def _summary_tables(records, stat, wide=True):
    headers, rows, provs = summary_rows(records, stat)
    if rows and wide:
        yield f"summary: time of nn.Linear and each provider's ratio to it ({stat})", headers, rows
    if rows:
        yield from _headline(records, stat, provs)
        headers, rows = target_rows(records, stat)
        if rows:
            # (the targets are set for an H100; a run may land on another GPU, an H200 for one)
            linear = [r for r in records if r.get("kind") == "linear"]
            devices = ", ".join(sorted({r["device_name"] for r in linear}))
            # (the decode is every M <= 16: name the ones timed, the others are not checked)
            decode = sorted({r["M"] for r in linear if r["M"] <= DECODE_MAX_M and r.get("K") == TARGET_K})
            title = (
                f"targets (issue 3, set for an H100) on {devices} at K = N = {TARGET_K}: M = {TARGET_M}, "
                f"decode = worst of M = {', '.join(map(str, decode)) or '-'} (of M <= {DECODE_MAX_M})"
            )
            yield title, headers, rows
        headers, rows = choice_rows(records, stat)
        if rows:
            title = "the kernels' unmeasured defaults against the measurements (geometric means over shapes and M)"
            yield title, headers, rows
    if wide:
        yield from _memory_table(records)
        headers, rows = plan_rows(records)
        if rows:
            yield f"kernels launched by the default fused provider (triton) at K = N = {TARGET_K}", headers, rows
    e2e = [r for r in records if r.get("kind") == "e2e"]
    if e2e:
        for title, h, rs in _e2e_tables(e2e, stat):
            yield "summary: " + title, h, rs
    for title, h, rs in _eager_tables(records, stat):
        yield "summary: " + title, h, rs


def plan_rows(records):
    """What one projection of the ``triton`` provider launched in each case at the targets' shape (its record's
    ``plan``, ``benchmarks/timing.py``'s ``plan_of``): the strategy, tiles, loads and split its times measured."""
    rows = [
        [r["shape"], r["dtype"], r["rank"], r["mode"], r["M"], r["plan"]]
        for r in records
        if r.get("kind") == "linear"
        and r["provider"] == "triton"
        and r.get("plan")
        and r.get("K") == r.get("N") == TARGET_K
    ]
    rows.sort(key=lambda row: (*row[:3], MODES.index(row[3]), row[4]))
    return ["shape", "dtype", "rank", "mode", "M", "kernels launched"], rows


def _memory_table(records):
    """Activation memory of a training step per provider: bytes saved for backward (and CUDA peak)."""
    lin = [r for r in records if r.get("kind") == "linear" and r["mode"] == "fwd+bwd"]
    provs = sorted({r["provider"] for r in lin}, key=_provider_key)
    cells = defaultdict(dict)
    for r in lin:
        for key in ((r["device_name"], r["shape"], r["dtype"], r["rank"], r["M"]),) if r["rank"] else ():
            cells[key][r["provider"]] = r
    floor = {(r["device_name"], r["shape"], r["dtype"], r["M"]): r for r in lin if r["provider"] == FLOOR}
    peak = any(r.get("peak_bytes") is not None for r in lin)
    headers = ["shape", "dtype", "rank", "M"] + [f"{p} saved MiB" for p in provs]
    headers += [f"{p} peak MiB" for p in provs] if peak else []
    rows = []
    for key in sorted(cells):
        dev, shape, dtype, rank, M = key
        row_recs = [cells[key].get(p) or (floor.get((dev, shape, dtype, M)) if p == FLOOR else None) for p in provs]
        row = [shape, dtype, rank, M] + [_mib(r.get("saved_bytes")) if r else "-" for r in row_recs]
        row += [_mib(r.get("peak_bytes")) if r else "-" for r in row_recs] if peak else []
        rows.append(row)
    if rows:
        yield (
            "memory of fwd+bwd: bytes saved for backward (weights excluded)" + (", CUDA peak" if peak else ""),
            headers,
            rows,
        )


def target_rows(records, stat="median"):
    """Each fused-kernel provider against issue 3's targets at K = N = 4096: ratio, "ok"/"MISS", and a count.

    ``triton`` (the default) has a row at each of the issue's ranks wherever nn.Linear was timed at that shape,
    measured or not: a provider that did not run (skipped, failed, cut by the time budget) reads as unmeasured
    targets rather than as no row."""
    floors = _floor_times(records, stat)
    # the decode Ms any provider was timed at, per (device, shape, dtype): a provider with a ratio at fewer (its
    # own record or the floor's missing) is marked, and its "ok" is not counted as met
    decode_ms = defaultdict(set)
    ratios = defaultdict(dict)  # (device, shape, dtype, rank, provider) -> (mode, M) -> time / nn.Linear
    times = defaultdict(dict)  # the same keys -> (mode, M) -> time
    eager = set()  # keys whose decode ran eagerly, the graph capture having failed (the floor's ran as a graph)
    for r in records:
        if r.get("kind") != "linear" or not r.get("K") == r.get("N") == TARGET_K:
            continue
        if r["mode"] == "forward" and r["M"] <= DECODE_MAX_M:
            decode_ms[(r["device_name"], r["shape"], r["dtype"])].add(r["M"])
        if r["provider"] == FLOOR:
            for rank in TARGET_RANKS:
                ratios.setdefault((r["device_name"], r["shape"], r["dtype"], rank, "triton"), {})
            continue
        key = (r["device_name"], r["shape"], r["dtype"], r["rank"], r["provider"])
        ratios[key][(r["mode"], r["M"])] = _ratio(r, floors, stat)
        times[key][(r["mode"], r["M"])] = r[stat]
        if _fell_back(r):
            eager.add(key)
    headers = ["shape", "dtype", "rank", "provider"] + [f"{name} ({how} {bound})" for name, bound, how in TARGETS]
    rows = []
    for key in sorted(ratios, key=lambda k: (*k[:4], _provider_key(k[4]))):
        if not key[4].startswith("triton") or key[4] == "triton-dropout":  # (the targets are without dropout)
            continue
        cells, torch_key = ratios[key], (*key[:4], "torch")
        fwd, both = cells.get(("forward", TARGET_M)), cells.get(("fwd+bwd", TARGET_M))
        decode = [v for (mode, M), v in cells.items() if mode == "forward" and M <= DECODE_MAX_M and v]
        values = (fwd, both, _faster(ratios, times, torch_key, key), max(decode, default=None))
        wanted = len(decode_ms[key[:3]])
        row, met, known = list(key[1:]), 0, 0
        for i, (value, (_, bound, how)) in enumerate(zip(values, TARGETS, strict=True)):
            if value is None:
                row.append("-")
                continue
            ok = value <= bound if how == "<=" else value >= bound
            # the decode target is the worst of every decode M timed at the shape
            cell = f"{_beside(value, bound, ok)} {'ok' if ok else 'MISS'}"
            is_decode = i == len(TARGETS) - 1
            partly = is_decode and len(decode) < wanted  # measured at fewer decode Ms than were timed
            if partly:
                cell = f"{_beside(value, bound, ok)}{'' if ok else ' MISS'} ({len(decode)} of {wanted} M)"
            if is_decode and key in eager:
                cell += " (eager)"
            if partly and ok:  # an unmeasured M may miss: neither met nor known
                row.append(cell)
                continue
            met, known = met + ok, known + 1
            row.append(cell)
        unknown = len(TARGETS) - known
        rows.append(row + [f"{met}/{len(TARGETS)} met" + (f", {unknown} unmeasured" if unknown else "")])
    return headers + ["met"], rows


def _faster(ratios, times, torch_key, key) -> float | None:
    """The torch path's fwd+bwd time over ours at M = TARGET_M: each against the floor timed beside it where both
    have that ratio (CPU runs pair the floor round by round), else of the two times (no floor needed)."""
    case = ("fwd+bwd", TARGET_M)
    theirs, ours = ratios.get(torch_key, {}).get(case), ratios[key].get(case)
    if not (theirs and ours):
        theirs, ours = times.get(torch_key, {}).get(case), times.get(key, {}).get(case)
    return theirs / ours if theirs and ours else None


def _beside(value: float, bound: float, ok: bool) -> str:
    """``value`` to 4 significant digits, more where a miss would print as its bound (1.05004: no "1.05 MISS")."""
    for digits in range(4, 10):
        shown = f"{value:.{digits}g}"
        if ok or float(shown) != bound:
            return shown
    return repr(value)


_FORCED_PROVIDERS = ("triton", "triton-1pass", "triton-2pass", "triton-ptr", "triton-1launch", "triton-intile")


def choice_rows(records, stat="median"):
    """What the forced-choice providers say about the defaults (``configs.py``), per dtype, regime, rank
    tile and mode: two-pass over one-pass time (below 1: two-pass wins) beside the strategy the sm90 table picks, the
    default (TMA loads on Hopper's 16-bit prefill) over pointer loads (below 1: TMA wins), and split-K partials summed
    in the GEMM's launch, which computes the rank-R term in every output tile, over the default (a second launch, the
    rank-R term apart; decode, timed as CUDA graphs, where the in-kernel sum also replays the zeroing of its arrival
    counts and the launch it saves costs little; below 1: it wins), and decode's rank-R term computed apart (the
    default, ``forcing.split_rank``) over in every output tile (``triton-intile``; below 1: apart wins). Each cell is
    one shape, M and rank (ranks 8 and 16 share a rank tile). The last column names each default the row's times
    contradict by more than ``_NOISE`` (what to change: ``configs._STRATEGY``, ``configs.TMA_MAJORS``,
    ``configs.DEFAULT_SPLIT_REDUCE``, ``configs.DEFAULT_SPLIT_RANK``), "-" when none. A pair is left out of a column
    (and counted in "cases") when its recorded launches (``launches``, ``_ran``) show that a side did not run what the
    column compares: the default's prefill without TMA loads (an operand TMA cannot describe), a decode that split no K
    (nothing to sum in the kernel or to compute apart)."""
    times = defaultdict(dict)  # (dtype, regime, BLOCK_R, mode, device, shape, M, rank) -> provider -> time
    for r in records:
        if r.get("kind") == "linear" and r["provider"] in _FORCED_PROVIDERS:
            block_r = configs.block_r_for(r["rank"])  # the fused kernels' ranks are 1..MAX_RANK
            key = (r["dtype"], configs.regime_of(r["M"]), block_r, r["mode"], r["device_name"], r["shape"], r["M"])
            times[key + (r["rank"],)][r["provider"]] = r  # (ranks 8 and 16 share BLOCK_R 16: two cells)
    groups = defaultdict(list)
    for key, cell in times.items():
        groups[key[:4]].append(cell)
    headers = ["dtype", "regime", "BLOCK_R", "mode", "cases", "2pass / 1pass", "sm90 table picks", "tma / ptr"]
    # decode runs as a CUDA graph: eager launches are the eager table's. The in-kernel sum computes the rank-R term
    # in every output tile, so its column sets that whole choice against the default (sum launch, rank-R apart)
    headers.append("1launch+in-tile / default (graph)")
    headers += ["apart / in-tile", "times prefer"]
    rows = []
    for (dtype, regime, block_r, mode), cells in sorted(
        groups.items(), key=lambda kv: (*kv[0][:3], MODES.index(kv[0][3]))
    ):
        columns = [_pair_ratio(cells, *pair, stat) for pair in _CHOICE_PAIRS]
        (passes, _), (loads, _), (sums, _), (apart, _) = columns
        if passes is None and loads is None and sums is None and apart is None:
            continue
        M = DECODE_MAX_M if regime == "decode" else DECODE_MAX_M + 1
        picks = configs.table_strategy("sm90", M, block_r, dtype == "float32")
        unlike = sum(left_out for _, left_out in columns)
        count = f"{len(cells)} ({unlike} pairs left out)" if unlike else len(cells)
        row = [dtype, regime, block_r, mode, count, _fmt(passes), picks, _fmt(loads), _fmt(sums), _fmt(apart)]
        rows.append([*row, ", ".join(_contradicted(passes, picks, loads, sums, apart)) or "-"])
    return headers, rows


_CHOICE_PAIRS = (
    ("triton-2pass", "triton-1pass", "LOAD_T"),
    ("triton", "triton-ptr", "TMA"),
    ("triton-1launch", "triton", "REDUCE"),
    ("triton", "triton-intile", "RANK_APART"),
)
"""``choice_rows``' comparisons: the provider timed over the one it is divided by, and the fused GEMM's switch that
the first must have run with and the second without (``LOAD_T``: the GEMM reads the shrink's ``t``, two-pass)."""


def _pair_ratio(cells, num: str, den: str, switch: str, stat: str) -> tuple[float | None, int]:
    """The geometric mean of ``num``'s time over ``den``'s over ``cells``, and how many pairs were left out because
    their launches show ``num`` without ``switch`` or ``den`` with it."""
    pairs = [(c[num], c[den]) for c in cells if num in c and den in c]
    kept = [(n, d) for n, d in pairs if _ran(n, switch) is not False and _ran(d, switch) is not True]
    return _geomean(n[stat] / d[stat] for n, d in kept), len(pairs) - len(kept)


def _ran(r, switch: str) -> bool | None:
    """Whether a fused provider's record shows a fused-GEMM launch with ``switch`` set (``LOAD_T``: two-pass,
    ``TMA``, ``REDUCE``, ``RANK_APART``); None when it recorded no launches (older JSON, other providers)."""
    launches = r.get("launches")
    if launches is None:
        return None
    return any(launch.get(switch) for launch in launches if launch.get("kernel") == "_fused_lora_mm_kernel")


_NOISE = 1.03
"""Ratios within 3 % of 1 are taken as a tie: a default changes on a clearer difference than that."""


def _contradicted(passes, picks, loads, sums, apart) -> list[str]:
    """The defaults a ``choice_rows`` row's ratios contradict, as the choice that won."""
    out = []
    if passes is not None and max(passes, 1 / passes) > _NOISE:
        won = "two_pass" if passes < 1 else "one_pass"
        if won != picks:
            out.append(won)
    if loads is not None and loads > _NOISE:  # the default's loads (TMA on Hopper's 16-bit prefill) lost
        out.append("pointer loads")
    if sums is not None and sums < 1 / _NOISE and configs.DEFAULT_SPLIT_REDUCE == "launch":
        out.append("reduce=kernel")
    if apart is not None and apart > _NOISE and configs.DEFAULT_SPLIT_RANK == "apart":
        out.append("split_rank=in_tile")
    return out


def _headline(records, stat, provs):
    """Geometric means over shapes and M: each provider vs nn.Linear, and ours vs PEFT at the same rank. Decode
    (forward at M ≤ 16, timed as CUDA graphs on a GPU) is a row of its own: providers that run only at decode or
    only at prefill (``triton-1launch``, ``triton-ptr``) then average over the same cases as the others."""
    floors = _floor_times(records, stat)
    ratios = defaultdict(dict)  # (device, shape, dtype, rank, mode, M) -> provider -> time / nn.Linear
    for r in records:
        if r.get("kind") == "linear" and r["provider"] != FLOOR:
            mode = "decode" if r["mode"] == "forward" and r["M"] <= DECODE_MAX_M else r["mode"]
            key = (r["device_name"], r["shape"], r["dtype"], r["rank"], mode, r["M"])
            ratios[key][r["provider"]] = _ratio(r, floors, stat)
    ours = [p for p in ("torch", "torch.compile", "triton") if p in provs]
    pairs = [(a, b) for a in ours for b in ("peft-lora", "peft-vera") if b in provs]
    if "triton-dropout" in provs and "peft-lora-dropout" in provs:  # training with adapter dropout
        pairs.append(("triton-dropout", "peft-lora-dropout"))
    headers = ["mode", "rank", "cases"] + [f"{p} / nn.Linear" for p in provs] + [f"{a} / {b}" for a, b in pairs]
    rows = []
    for mode in ("decode", *MODES):
        for rank in sorted({k[3] for k in ratios if k[4] == mode}):
            cells = [ratios[k] for k in ratios if k[4] == mode and k[3] == rank]
            row = [mode, rank, len(cells)]
            row += [_of(cells, [c.get(p) for c in cells]) for p in provs]
            # a / b = (a / nn.Linear) / (b / nn.Linear): each against the floor it was timed beside
            row += [_of(cells, [c[a] / c[b] if c.get(a) and c.get(b) else None for c in cells]) for a, b in pairs]
            rows.append(row)
    if rows:
        yield f"headline: geometric mean of time ratios over shapes and M ({stat}; below 1 = faster)", headers, rows


def _of(cells, values) -> str:
    """The geometric mean of ``values`` (one per case of ``cells``, None where a case has none), with how many cases
    it covers when that is fewer than the row's: a provider missing from some (failed, cut by the time budget)
    is then averaged over other cases than its neighbours."""
    measured = [v for v in values if v]
    shown = _fmt(_geomean(measured))
    return shown if not measured or len(measured) == len(cells) else f"{shown} ({len(measured)} of {len(cells)})"


def _table(headers, rows, markdown=False) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in cells]
        lines.insert(1, "|" + "|".join("---" for _ in headers) + "|")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def _fmt_time(t) -> str:
    if t is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t / 1e-9:.3g} ns"


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.2f}"
