"""``python -m tied_lora_kernels bench``: run the benchmark suite (or read its JSON) and report it.

Usage::

    python -m tied_lora_kernels bench                       # run benchmarks/ (default tier), report
    python -m tied_lora_kernels bench -- -m "slow or not slow"   # the full grid (args after -- go to pytest)
    python -m tied_lora_kernels bench --json a.json [b.json] --plot out.png --markdown out.md
    python -m tied_lora_kernels bench --json a.json --summary   # the short table only

Prints one table per shape (provider, time, TFLOP/s, GB/s, ratio to ``nn.Linear``, memory), the
end-to-end training steps, and a summary; writes a PNG of the ratio to ``nn.Linear`` against tokens per
provider (needs matplotlib) and optionally a markdown report. A progress bar (tqdm if installed) while the
suite runs; pytest's own output goes to ``<out>/pytest.log``. The tables themselves: ``bench_tables.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from .bench_tables import (
    MODES,
    _fallback_notes,
    _floor_times,
    _geomean,
    _provider_key,
    _ratio,
    _shape_tables,
    _summary_tables,
    _table,
)

__all__ = ["main", "load"]

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(
        prog="python -m tied_lora_kernels bench",
        description="Run the benchmark suite (or read its JSON) and report it. Arguments after -- go to pytest.",
        # (python -OO strips the docstring the examples come from)
        epilog="examples:\n" + __doc__.split("Usage::")[1].split("Prints")[0].rstrip() if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", nargs="+", type=Path, help="read these pytest-benchmark JSON files, run nothing")
    p.add_argument(
        "--out", type=Path, help="folder for the run's JSON, plot and log (default bench-out; with --json: the plot's)"
    )
    p.add_argument("--plot", type=Path, help="PNG path (default <out>/bench.png; with --json and no --out, next to it)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--markdown", type=Path, help="also write a markdown report here")
    p.add_argument(
        "--note", type=Path, help="a text file whose lines head the markdown report (gpu_check: commit, phase status)"
    )
    p.add_argument("--summary", action="store_true", help="print only the summary tables")
    p.add_argument("--headline", action="store_true", help="print only the headline, end-to-end and eager tables")
    p.add_argument("--stat", choices=("median", "min", "mean"), default="median", help="time statistic")
    p.add_argument("--rank", type=int, help="rank shown in the plot (default: 16 if measured)")
    args = p.parse_args(argv)

    rc = 0
    if args.json:
        paths = args.json
        out_dir = args.out or args.json[0].parent
    else:
        out_dir = args.out or Path("bench-out")
        rc, path = _run_suite(out_dir, pytest_args)
        if not path.exists():
            print(f"bench: pytest exited with {rc} and wrote no results (see {out_dir / 'pytest.log'})")
            return rc or 1
        paths = [path]
    records = load(paths)
    if not records:
        print("bench: no benchmark results in " + ", ".join(map(str, paths)))
        return rc or 1
    if not (args.summary or args.headline):
        for title, headers, rows in _shape_tables(records, args.stat):
            print(f"\n{title}\n" + _table(headers, rows))
    for title, headers, rows in _summary_tables(records, args.stat, wide=not args.headline):
        print(f"\n{title}\n" + _table(headers, rows))
    for note in _fallback_notes(records):  # ours then reads slower than it is; an eager floor has no ratios
        print(f"bench: NOTE {note}")
    plot = None
    if not args.no_plot:
        try:  # (the tables and the markdown matter more than the plot)
            plot = _plot(records, args.plot or out_dir / "bench.png", args.stat, args.rank)
        except Exception as e:
            print(f"bench: the plot failed, none written: {type(e).__name__}: {e}", file=sys.stderr)
    if args.markdown:
        note = args.note.read_text().splitlines() if args.note and args.note.is_file() else []
        _write_markdown(records, args.markdown, args.stat, plot, note)
        print(f"\nbench: wrote {args.markdown}")
    return rc


# ---------------------------------------------------------------------------------------------------------
# running the suite


def _run_suite(out_dir: Path, pytest_args: list[str]) -> tuple[int, Path]:
    try:
        import pytest
        import pytest_benchmark  # noqa: F401  (the suite's timer)
    except ImportError as e:
        needs = f"bench: running the suite needs pytest and pytest-benchmark ({e}): pip install -e '.[bench]'"
        raise SystemExit(needs) from None

    if not BENCH_DIR.is_dir():
        raise SystemExit(f"bench: no benchmarks folder at {BENCH_DIR} (run from a source checkout)")
    out_dir.mkdir(parents=True, exist_ok=True)
    path, log = out_dir / "bench.json", out_dir / "pytest.log"
    progress = _Progress()
    cmd = [str(BENCH_DIR), f"--benchmark-json={path}", "-q", *pytest_args]
    print(f"bench: pytest {' '.join(cmd)}  (log: {log})", flush=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f):
        rc = int(pytest.main(cmd, plugins=[progress]))
    progress.close()
    for nodeid, message in progress.failures:
        print(f"FAILED {nodeid}: {message}")
    return rc, path


class _Progress:
    """pytest plugin: a progress bar over the collected benchmarks (tqdm, or a line every 10 %)."""

    def __init__(self):
        self.total, self.done, self.skipped, self.failures = 0, 0, 0, []
        self.bar, self.start, self.next_line = None, time.monotonic(), 0.0

    def pytest_collection_finish(self, session):
        self.total = len(session.items)

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failures.append((report.nodeid, _first_line(report)))
        elif report.skipped:
            self.skipped += 1
        if report.when != "teardown":
            return
        self.done += 1
        if self.bar is None and sys.__stderr__.isatty():
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, desc="bench", unit="case", file=sys.__stderr__)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(skipped=self.skipped, failed=len(self.failures), refresh=False)
        elif self.done / max(self.total, 1) >= self.next_line or self.done == self.total:
            self.next_line += 0.1
            elapsed = time.monotonic() - self.start
            print(
                f"bench: {self.done}/{self.total} cases, {self.skipped} skipped, {len(self.failures)} failed, "
                f"{elapsed:.0f} s",
                file=sys.__stderr__,
                flush=True,
            )

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _first_line(report) -> str:
    text = getattr(report, "longreprtext", "") or ""
    lines = [ln for ln in text.splitlines() if ln.startswith("E ")]
    return (lines[0][1:].strip() if lines else text.strip().splitlines()[-1:] or ["?"])[0][:200]


# ---------------------------------------------------------------------------------------------------------
# reading results


_STATS = ("median", "min", "mean", "stddev", "rounds")
"""The statistics of a pytest-benchmark record that the report reads."""


def load(paths: Sequence[Path]) -> list[dict]:
    """Flatten pytest-benchmark JSON files into one record per benchmark (extra_info + stats). A file that cannot
    be read, or a record without its statistics, is left out with a message: the others still make a report (a
    GPU run whose phase was cut short)."""
    records = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:  # (a missing file, not JSON)
            print(f"bench: cannot read {path}, left out: {e}", file=sys.stderr)
            continue
        machine = data.get("machine_info", {}).get("tied_lora", {})
        lost = []
        for b in data.get("benchmarks", []):
            info = b.get("extra_info") or {}
            if "provider" not in info:  # timed, then failed before recording what it was (or not ours)
                lost.append(b.get("name"))
                continue
            rec = {**machine, **info, "name": b.get("name"), "datetime": data.get("datetime")}
            stats = b.get("stats") or {}
            missing = [stat for stat in _STATS if stat not in stats]
            if missing:
                print(f"bench: {path}: {b.get('name')} has no {missing}, left out", file=sys.stderr)
                continue
            rec.update({stat: stats[stat] for stat in _STATS})
            rec.setdefault("device_name", rec.get("device", "?"))
            records.append(rec)
        if lost:
            print(f"{path}: {len(lost)} benchmarks without a provider record left out: {lost[:3]}", file=sys.stderr)
    return records


# ---------------------------------------------------------------------------------------------------------
# plot and markdown


def _plot(records, path: Path, stat: str, rank: int | None) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed, no plot")
        return None
    lin = [r for r in records if r.get("kind") == "linear"]
    ranks = sorted({r["rank"] for r in lin if r["rank"]})
    if not ranks:
        return None
    rank = rank if rank in ranks else (16 if 16 in ranks else ranks[0])
    floors = _floor_times(records, stat)
    dtypes = sorted({r["dtype"] for r in lin})
    fig, axes = plt.subplots(len(dtypes), 3, figsize=(15, 4.2 * len(dtypes)), squeeze=False)
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            series: dict[str, dict[int, list[float | None]]] = defaultdict(lambda: defaultdict(list))
            for r in lin:
                if r["dtype"] == dtype and r["mode"] == mode and r["rank"] == rank:
                    series[r["provider"]][r["M"]].append(_ratio(r, floors, stat))
            for provider in sorted(series, key=_provider_key):
                Ms = sorted(series[provider])
                style = "--" if provider.startswith("peft") else "-"  # ours solid, PEFT dashed
                ax.plot(Ms, [_geomean(series[provider][m]) for m in Ms], style, marker="o", label=provider)
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode}, {dtype}, rank {rank}")
            ax.set_xlabel("tokens M")
            ax.set_ylabel(f"time / nn.Linear ({stat}, geomean over shapes)")
            ax.grid(True, which="both", alpha=0.3)
            if series:
                ax.legend(fontsize=8)
    devs = sorted({r["device_name"] + (f" ({r['threads']} thread)" if r.get("threads") else "") for r in lin})
    versions = sorted({f"torch {r.get('torch')}, triton {r.get('triton')}" for r in lin})
    fig.suptitle(f"Tied-LoRA layer vs nn.Linear (floor = 1) on {', '.join(devs)}; {'; '.join(versions)}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"bench: wrote {path}")
    return path


def _write_markdown(records, path: Path, stat: str, plot: Path | None, note: Sequence[str] = ()) -> None:
    """The report: what ran where, then every summary table; ``note``'s lines (the run's commit and phase
    status, from gpu_check) in a block after the title."""
    r0 = records[0]
    devs = sorted({r["device_name"] for r in records})
    lines = ["# Benchmark results", ""]
    if note:
        lines += ["```", *note, "```", ""]
    lines += [
        f"- device: {', '.join(devs)}" + (f" ({r0['threads']} CPU thread(s) used)" if r0.get("threads") else ""),
        f"- torch {r0.get('torch')}, triton {r0.get('triton')}, peft {r0.get('peft')}, "
        f"transformers {r0.get('transformers')}, python {r0.get('python')}",
        f"- date: {r0.get('datetime')}",
        f"- statistic: {stat} of each benchmark's rounds; ratios are time / time of nn.Linear "
        "(same shape, M, dtype, mode), below 1 = faster",
    ]
    if any(r.get("paired_floor") for r in records):
        lines += [
            "- paired timing: each provider's rounds alternate with rounds of its reference (nn.Linear of the "
            "same case; PEFT LoRA for the training steps), and ratios use that reference, so they hold on a busy "
            "machine; the e2e peft-lora row is a control (a second PEFT LoRA model), expected near 1",
        ]
    notes = _fallback_notes(records)
    if notes:
        lines += ["- timed without a CUDA graph (its capture failed; nn.Linear's case then has no ratios):"]
        lines += [f"  - {note}" for note in notes]
    lines.append("")
    if plot:
        lines += [f"![ratio to nn.Linear]({_relative(plot, path.parent)})", ""]
    order = ("targets", "headline", "summary: end-to-end", "summary: eager", "memory", "summary: time")
    tables = sorted(
        _summary_tables(records, stat), key=lambda t: next(i for i, o in enumerate(order + ("",)) if t[0].startswith(o))
    )
    for title, headers, rows in tables:
        lines += [f"## {title}", "", _table(headers, rows, markdown=True), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _relative(target: Path, base: Path) -> str:
    try:
        return str(target.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(target)


if __name__ == "__main__":
    sys.exit(main())
