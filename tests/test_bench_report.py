"""The benchmark report (``python -m tied_lora_kernels bench --json ...``) reads a committed pytest-benchmark
JSON and prints the tables the GPU check ends with; the benchmarks themselves run outside the test suite."""

import json
from pathlib import Path

import pytest

from tied_lora_kernels.bench import _write_markdown, load, main
from tied_lora_kernels.bench_tables import _headline, _summary_tables, choice_rows, summary_rows, target_rows

RESULTS = sorted((Path(__file__).parent.parent / "benchmarks" / "results").glob("cpu-*.json"))


@pytest.mark.skipif(not RESULTS, reason="no committed CPU results")
def test_report_from_committed_json(tmp_path, capsys):
    markdown = tmp_path / "report.md"
    assert main(["--json", str(RESULTS[-1]), "--no-plot", "--markdown", str(markdown)]) == 0
    out = capsys.readouterr().out
    assert "peft-lora" in out and "nn.Linear" in out
    text = markdown.read_text()
    assert "## headline" in text and "| fwd+bwd | 8 |" in text
    assert main(["--json", str(RESULTS[-1]), "--headline", "--no-plot"]) == 0
    assert "torch / peft-lora" in capsys.readouterr().out
    # gpu_check's --note (the commit and the phases' outcomes) heads the report, before any table
    note = tmp_path / "note.txt"
    note.write_text("gpu_check 2026-12-06, commit abc1234\nparity         FAILED (rc=1)     90s\n")
    assert main(["--json", str(RESULTS[-1]), "--no-plot", "--markdown", str(markdown), "--note", str(note)]) == 0
    text = markdown.read_text()
    assert text.index("commit abc1234") < text.index("parity         FAILED") < text.index("## headline")


@pytest.mark.skipif(not RESULTS, reason="no committed CPU results")
def test_out_places_the_plot_of_a_report_read_from_json(tmp_path, monkeypatch, capsys):
    """``--out`` with ``--json`` is the plot's folder (it was ignored: the plot went next to the JSON)."""
    from tied_lora_kernels import bench

    where = []
    monkeypatch.setattr(bench, "_plot", lambda records, path, *args: where.append(path))
    assert main(["--json", str(RESULTS[-1]), "--out", str(tmp_path), "--summary"]) == 0
    assert main(["--json", str(RESULTS[-1]), "--summary"]) == 0
    assert where == [tmp_path / "bench.png", RESULTS[-1].parent / "bench.png"]


def _record(provider, mode, M, seconds, rank=16):
    return dict(
        kind="linear", provider=provider, shape="llama2-7b.qkvo", K=4096, N=4096, dtype="bfloat16",
        rank=0 if provider == "nn.Linear" else rank, mode=mode, M=M, device_name="H100", median=seconds,
    )  # fmt: skip


def test_targets_table_reads_each_target_against_its_bound():
    floors = [_record("nn.Linear", mode, M, 1.0) for mode, M in (("forward", 8192), ("fwd+bwd", 8192))]
    floors += [_record("nn.Linear", "forward", M, 1.0) for M in (1, 16)]
    ours = [
        _record("triton", "forward", 8192, 1.02),  # <= 1.05: ok
        _record("triton", "fwd+bwd", 8192, 1.20),  # > 1.15: miss
        _record("torch", "fwd+bwd", 8192, 1.80),  # torch / ours = 1.5 >= 1.3: ok
        _record("triton", "forward", 1, 1.01),
        _record("triton", "forward", 16, 1.10),  # the worst decode point decides: miss
        _record("triton-2pass", "forward", 8192, 1.04),  # nothing else measured: 1 of 1
    ]
    headers, rows = target_rows(floors + ours)
    rows = {(row[2], row[3]): row for row in rows}
    assert headers[-1] == "met" and list(rows) == [(8, "triton"), (16, "triton"), (16, "triton-2pass"), (64, "triton")]
    assert rows[16, "triton"][:4] == ["llama2-7b.qkvo", "bfloat16", 16, "triton"]
    assert rows[16, "triton"][4:] == ["1.02 ok", "1.2 MISS", "1.5 ok", "1.1 MISS", "2/4 met"]
    assert rows[16, "triton-2pass"][4:] == ["1.04 ok", "-", "-", "-", "1/4 met, 3 unmeasured"]
    # the ranks not timed (skipped, failed, out of time) are rows of unmeasured targets, not left out
    assert rows[8, "triton"][4:] == rows[64, "triton"][4:] == ["-", "-", "-", "-", "0/4 met, 4 unmeasured"]
    # decode measured at M = 1 only, where the floor has 1 and 16: marked, and an "ok" there is not counted as met
    headers, rows = target_rows(floors + [_record("triton-1pass", "forward", 1, 1.01)] + ours[:1])
    assert rows[2][3:] == ["triton-1pass", "-", "-", "-", "1.01 (1 of 2 M)", "0/4 met, 4 unmeasured"]
    headers, rows = target_rows(floors + [_record("triton-1pass", "forward", 1, 1.0523)])
    assert rows[2][7:] == ["1.052 MISS (1 of 2 M)", "0/4 met, 3 unmeasured"]  # a miss is one whatever else ran
    # a decode whose graph capture failed ran eagerly, against a floor timed as a graph: the cell says so
    failed = [dict(r, timing="cuda-events (graph capture failed: RuntimeError: ...)") for r in ours[3:5]]
    headers, rows = target_rows(floors + failed)
    assert headers[7] == "decode fwd / nn.Linear, CUDA graph (<= 1.05)"
    assert rows[1][7:] == ["1.1 MISS (eager)", "0/4 met, 3 unmeasured"]
    headers, rows = target_rows(floors + failed[:1])  # one decode M of two, eager: both said
    assert rows[1][7:] == ["1.01 (1 of 2 M) (eager)", "0/4 met, 4 unmeasured"]
    # its title names the GPU the ratios come from (the targets are an H100's; a run may land on an H200)
    h200 = [dict(r, device_name="NVIDIA H200") for r in floors + ours]
    titles = [title for title, _, _ in _summary_tables(h200, "median")]
    assert any(t.startswith("targets (issue 3, set for an H100) on NVIDIA H200 at K = N") for t in titles), titles
    # and the decode Ms it was timed at (the decode is every M <= 16)
    assert any(t.endswith("decode = worst of M = 1, 16 (of M <= 16)") for t in titles), titles


def test_targets_do_not_lean_on_a_missing_floor_or_round_to_their_bound():
    floors = [_record("nn.Linear", mode, M, 1.0) for mode, M in (("forward", 8192), ("fwd+bwd", 8192))]
    floors += [_record("nn.Linear", "forward", M, 1.0) for M in (1, 16)]
    ours = [_record("triton", "forward", 1, 1.01), _record("triton", "forward", 16, 1.06)]
    # the floor's M = 16 failed: ours was timed there too, so the decode verdict covers 1 of 2 Ms, not all
    headers, rows = target_rows(floors[:3] + ours)
    assert rows[1][7:] == ["1.01 (1 of 2 M)", "0/4 met, 4 unmeasured"]
    # torch / ours needs no floor: of the two fwd+bwd times when the floor's is missing
    both = [_record("torch", "fwd+bwd", 8192, 1.495), _record("triton", "fwd+bwd", 8192, 1.15)]
    headers, rows = target_rows(floors[:1] + both)
    assert rows[1][4:] == ["-", "-", "1.3 ok", "-", "1/4 met, 3 unmeasured"]
    # a ratio just past its bound is printed with the digits that tell it from the bound
    headers, rows = target_rows(floors + [_record("triton", "forward", 8192, 1.05004)])
    assert rows[1][4] == "1.05004 MISS"
    headers, rows = target_rows(floors + [_record("triton", "forward", 8192, 1.05)])
    assert rows[1][4] == "1.05 ok"


def test_ratios_divide_times_of_one_run():
    """A report read from a run's JSON and a partial rerun's (``--json a b``) divides each time by the floor of its
    own run (issue 3: ratios measured in one process): a rerun's floor no longer rescales the first run's times."""
    run = [dict(r, datetime="2026-12-06T10:00") for r in
           (_record("nn.Linear", "forward", 8192, 1.00), _record("triton", "forward", 8192, 1.04))]  # fmt: skip
    rerun = [dict(_record("nn.Linear", "forward", 8192, 0.95), datetime="2026-12-06T10:30")]
    for records in (run, run + rerun, rerun + run):
        headers, rows = target_rows(records)
        assert {(row[2], row[3]): row[4] for row in rows}[16, "triton"] == "1.04 ok"
        assert summary_rows(records)[1][0][6] == "1.04"


def test_headline_says_when_a_provider_covers_fewer_cases_than_its_row():
    floors = [dict(_record("nn.Linear", "forward", 8192, 1.0), shape=s) for s in ("a", "b")]
    ours = [dict(_record("torch", "forward", 8192, 1.2), shape=s) for s in ("a", "b")]
    ours.append(dict(_record("triton", "forward", 8192, 1.1), shape="a"))  # its case "b" missing (failed)
    ((_, headers, rows),) = _headline(floors + ours, "median", ["torch", "triton"])
    assert headers[3:5] == ["torch / nn.Linear", "triton / nn.Linear"]
    assert rows[0][:5] == ["forward", 16, 2, "1.2", "1.1 (1 of 2)"]


def test_an_eager_floor_gives_no_ratios_and_the_markdown_says_so(tmp_path):
    # nn.Linear's decode timed eagerly (its capture failed) against ours as a graph would read too fast: no ratio
    failed = "cuda-events (graph capture failed: RuntimeError: ...)"
    floors = [_record("nn.Linear", "forward", 1, 1.0), dict(_record("nn.Linear", "forward", 16, 1.0), timing=failed)]
    ours = [_record("triton", "forward", 1, 1.01), _record("triton", "forward", 16, 0.5)]
    records = [dict(r, name=f"test_linear[{r['provider']}-M{r['M']}]") for r in floors + ours]
    headers, rows = target_rows(records)
    assert rows[1][7:] == ["1.01 (1 of 2 M)", "0/4 met, 4 unmeasured"]  # M = 16 has no ratio: neither met nor known
    ((_, headers, rows),) = _headline(records, "median", ["triton"])
    assert rows[0][:4] == ["decode", 16, 2, "1.01 (1 of 2)"]  # (the M = 16 case has no ratio)
    path = tmp_path / "bench.md"
    _write_markdown(records, path, "median", None)
    assert f"test_linear[nn.Linear-M16] was timed without a CUDA graph: {failed}" in path.read_text()


def test_headline_keeps_decode_apart():
    # triton-1launch runs at decode only and triton-ptr at prefill only: in one "forward" row their means would be
    # over other cases than triton's (decode 1.3 and prefill 1.0 averaged, against 1launch's decode 1.25 alone)
    floors = [_record("nn.Linear", "forward", M, 1.0) for M in (1, 8192)]
    ours = [_record("triton", "forward", 1, 1.3), _record("triton-1launch", "forward", 1, 1.25)]
    ours += [_record("triton", "forward", 8192, 1.0), _record("triton-ptr", "forward", 8192, 1.1)]
    ((_, headers, rows),) = _headline(floors + ours, "median", ["triton", "triton-1launch", "triton-ptr"])
    assert headers[:6] == ["mode", "rank", "cases", "triton / nn.Linear", "triton-1launch / nn.Linear",
                           "triton-ptr / nn.Linear"]  # fmt: skip
    assert rows == [["decode", 16, 1, "1.3", "1.25", "-"], ["forward", 16, 1, "1", "-", "1.1"]]


def test_load_names_benchmarks_without_a_provider_record(tmp_path, capsys):
    # a case that was timed and then failed before its extra_info was written would vanish from every table
    stats = dict(median=1.0, min=1.0, mean=1.0, stddev=0.0, rounds=1)
    data = {
        "benchmarks": [
            dict(name="test_linear[a]", stats=stats, extra_info={}),
            dict(name="test_linear[b]", stats=stats, extra_info=_record("nn.Linear", "forward", 1, 1.0)),
        ]
    }
    (tmp_path / "b.json").write_text(json.dumps(data))
    assert len(load([tmp_path / "b.json"])) == 1
    assert "1 benchmarks without a provider record left out: ['test_linear[a]']" in capsys.readouterr().err


def test_choice_table_compares_the_forced_providers():
    recs = [
        _record("triton-1pass", "forward", 8192, 1.10, rank=64),
        _record("triton-2pass", "forward", 8192, 0.99, rank=64),  # two-pass wins at BLOCK_R = 64
        _record("triton", "forward", 8192, 0.99, rank=64),
        _record("triton-ptr", "forward", 8192, 1.10, rank=64),  # TMA (the default) wins
        _record("triton-1pass", "forward", 1, 1.0, rank=8),
        _record("triton-2pass", "forward", 1, 1.2, rank=8),  # one-pass wins at decode, BLOCK_R = 16
        _record("triton", "forward", 1, 1.0, rank=8),
        _record("triton-1launch", "forward", 1, 0.8, rank=8),  # the in-kernel split-K sum wins
        _record("triton-intile", "forward", 1, 1.25, rank=8),  # the rank-R term apart (the default) wins
        _record("torch", "forward", 8192, 2.0, rank=64),  # not a forced choice: ignored
    ]
    headers, rows = choice_rows(recs)
    assert headers[5:] == [
        "2pass / 1pass", "sm90 table picks", "tma / ptr", "1launch+in-tile / default (graph)", "apart / in-tile",
        "times prefer",
    ]  # fmt: skip
    assert rows == [
        ["bfloat16", "decode", 16, "forward", 1, "1.2", "one_pass", "-", "0.8", "0.8", "reduce=kernel"],
        ["bfloat16", "prefill", 64, "forward", 1, "0.9", "two_pass", "0.9", "-", "-", "-"],
    ]
    # ranks 8 and 16 share BLOCK_R = 16 but are two cells: rank 16's two-pass time is not set against rank 8's
    # one-pass time, and neither overwrites the other
    recs += [_record("triton-2pass", "forward", 1, 0.9, rank=16)]
    assert choice_rows(recs)[1][0][4:10] == [2, "1.2", "one_pass", "-", "0.8", "0.8"]
    recs += [_record("triton-1pass", "forward", 1, 1.2, rank=16)]  # 0.75 at rank 16
    assert choice_rows(recs)[1][0][4:6] == [2, "0.949"]  # the geometric mean of 1.2 and 0.75


def _launched(**switches):
    return [{"kernel": "_prepare_kernel", "grid": [1]}, {"kernel": "_fused_lora_mm_kernel", "grid": [4, 1], **switches}]


def test_choice_table_leaves_out_pairs_whose_launches_did_not_run_the_choice():
    # the default's prefill without TMA (its operands could not be described), a decode that split no K: the times
    # would compare two runs of the same kernels, and read as a tie or as noise
    recs = [
        _record("triton", "forward", 8192, 1.0, rank=64) | {"launches": _launched(TMA=False)},
        _record("triton-ptr", "forward", 8192, 1.2, rank=64) | {"launches": _launched(TMA=False)},
        _record("triton-1pass", "forward", 8192, 1.1, rank=64) | {"launches": _launched(LOAD_T=False)},
        _record("triton-2pass", "forward", 8192, 0.99, rank=64) | {"launches": _launched(LOAD_T=True)},
        _record("triton", "forward", 1, 1.0, rank=8) | {"launches": _launched(SPLIT_K=False, RANK_APART=False)},
        _record("triton-1launch", "forward", 1, 0.8, rank=8) | {"launches": _launched(REDUCE=False)},
        _record("triton-intile", "forward", 1, 1.25, rank=8) | {"launches": _launched(RANK_APART=False)},
    ]
    _, rows = choice_rows(recs)
    assert rows == [
        ["bfloat16", "prefill", 64, "forward", "1 (1 pairs left out)", "0.9", "two_pass", "-", "-", "-", "-"],
    ]  # (the decode row: every pair left out, no column left)
    recs[0]["launches"] = _launched(TMA=True)  # as the default runs on Hopper: the pair counts
    recs[4]["launches"] = _launched(SPLIT_K=True, RANK_APART=True)
    recs[5]["launches"] = _launched(SPLIT_K=True, REDUCE=True)
    recs[6]["launches"] = _launched(SPLIT_K=True)
    _, rows = choice_rows(recs)
    assert [row[4:6] + row[7:10] for row in rows] == [[1, "-", "-", "0.8", "0.8"], [1, "0.9", "0.833", "-", "-"]]


def test_markdown_lists_what_the_default_fused_provider_launched(tmp_path):
    plan = "prepare[w4 grid 3] · fused_lora_mm[M128 N256 K64 R16 w8 s3 TMA grid 32x1]"
    recs = [
        _record("nn.Linear", "forward", 8192, 1.0),
        _record("triton", "forward", 8192, 1.02) | {"plan": plan},
        _record("triton-ptr", "forward", 8192, 1.1) | {"plan": "not the default's"},
    ]
    _write_markdown(recs, tmp_path / "report.md", "median", None)
    text = (tmp_path / "report.md").read_text()
    assert "## kernels launched by the default fused provider (triton) at K = N = 4096" in text
    assert f"| llama2-7b.qkvo | bfloat16 | 16 | forward | 8192 | {plan} |" in text and "not the default's" not in text


def test_choice_table_names_the_defaults_the_times_contradict():
    recs = [
        _record("triton-1pass", "forward", 8192, 1.0, rank=8),
        _record("triton-2pass", "forward", 8192, 0.9, rank=8),  # two-pass wins where the table picks one-pass
        _record("triton", "forward", 8192, 1.1, rank=8),
        _record("triton-ptr", "forward", 8192, 1.0, rank=8),  # pointer loads beat the default's TMA
        _record("triton", "forward", 1, 1.0, rank=8),
        _record("triton-1launch", "forward", 1, 0.99, rank=8),  # within the noise: a tie
        _record("triton-intile", "forward", 1, 0.9, rank=8),  # the rank-R term in every tile wins
    ]
    _, rows = choice_rows(recs)
    assert [row[6] for row in rows] == ["one_pass", "one_pass"]
    assert [row[-1] for row in rows] == ["split_rank=in_tile", "two_pass, pointer loads"]


def test_eager_table_is_per_projection_against_nn_linear():
    from tied_lora_kernels.bench_tables import _eager_tables

    def eager(provider, seconds):
        return dict(
            kind="eager", provider=provider, shape="llama2-7b.qkvo", dtype="bfloat16", layers=8, device_name="H100",
            rank=0 if provider == "nn.Linear" else 16, median=seconds, timing="cuda-events",
        )  # fmt: skip

    recs = [eager("nn.Linear", 80e-6), eager("triton", 240e-6), eager("peft-lora", 400e-6)]
    recs.append(eager("triton-host", 160e-6))
    (title, headers, rows), *rest = _eager_tables(recs, "median")
    assert not rest and title.startswith("eager decode: 8 x llama2-7b.qkvo")
    assert headers[2:4] == ["per projection (median)", "x nn.Linear"]
    # per projection: the round over 8; the ratio against nn.Linear's stack; none for the stubbed host path
    assert rows == [
        ["nn.Linear", "-", "10 us", "1", "cuda-events"],
        ["triton", 16, "30 us", "3", "cuda-events"],
        ["triton-host", 16, "20 us", "-", "wall, launches stubbed"],
        ["peft-lora", 16, "50 us", "5", "cuda-events"],
    ]


def test_the_command_line_answers_help_and_refuses_an_unknown_command(capsys):
    from tied_lora_kernels.__main__ import main as cli

    for flag in ("-h", "--help"):
        assert cli([flag]) == 0
        out, err = capsys.readouterr()
        assert "the self-check" in out and "bench [...]" in out and not err
    assert cli(["selftest"]) == 2
    out, err = capsys.readouterr()
    assert "unknown command 'selftest'" in err and "the self-check" in err and not out
    # the self-check takes no options: --help prints the usage, anything else is refused (it ran the whole check)
    assert cli(["selfcheck", "--help"]) == 0
    assert "the self-check" in capsys.readouterr().out
    assert cli(["selfcheck", "--bogus"]) == 2
    assert "selfcheck takes no arguments, got ['--bogus']" in capsys.readouterr().err


def test_the_self_check_says_why_the_kernels_cannot_run_on_this_gpu(monkeypatch, capsys):
    # a GPU the kernels refuse (Hopper with an unsafe ptxas, ROCm, compute capability < 8): a line that says why,
    # rather than no triton row at all; the torch rows still run there
    import torch

    from tied_lora_kernels import kernels, selfcheck

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "unavailable_reason", lambda device: "the driver is too old")
    checked = []
    monkeypatch.setattr(selfcheck, "parity", lambda backend, device, dtype: checked.append((backend, device)) or 0.0)
    assert selfcheck.main() == 0
    out = capsys.readouterr().out
    assert ("torch", "cuda") in checked and ("triton", "cuda") not in checked
    assert "triton                 cuda   -                 -  skipped: the driver is too old" in out


def test_bench_names_a_file_it_cannot_read_and_reports_the_others(tmp_path, capsys):
    """A missing file, one that is not JSON (a GPU phase cut short), or a record without its statistics is left
    out with a message naming it, not a traceback; the readable files still make the report (exit 1 if none)."""
    (tmp_path / "not.json").write_text("{")
    (tmp_path / "nostats.json").write_text(json.dumps({"benchmarks": [dict(name="t", extra_info={"provider": "x"})]}))
    for name, match in (("missing.json", "No such file"), ("not.json", "Expecting"), ("nostats.json", "has no")):
        assert main(["--json", str(tmp_path / name), "--no-plot"]) == 1
        err = capsys.readouterr().err
        assert "bench: " in err and str(tmp_path / name) in err and match in err and "left out" in err
    stats = dict(median=1.0, min=1.0, mean=1.0, stddev=0.0, rounds=1)
    good = {"benchmarks": [dict(name="b", stats=stats, extra_info=_record("nn.Linear", "forward", 1, 1.0))]}
    (tmp_path / "good.json").write_text(json.dumps(good))
    assert len(load([tmp_path / "not.json", tmp_path / "good.json", tmp_path / "missing.json"])) == 1


@pytest.mark.parametrize("module", ["tied_lora_kernels", "tied_lora_kernels.kernels.compile_check"])
def test_the_command_lines_answer_help_under_python_OO(module):
    """python -OO strips docstrings: the usage and help texts do not come from them (they crashed on None)."""
    import subprocess
    import sys

    args = [sys.executable, "-OO", "-m", module] + (["bench"] if module == "tied_lora_kernels" else []) + ["--help"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]


def test_ratios_divide_by_the_floor_paired_with_them_for_the_statistic_read():
    """On CUDA a prefill round of ours follows a round of nn.Linear's (``timing._cuda_times``) and the record carries
    that floor's statistics (``paired_floor``): every ratio divides by it, in the statistic the report reads, not by
    the floor's own benchmark, timed 20-30 s apart on clocks that drift."""
    floors = [dict(_record("nn.Linear", "forward", 8192, 1.0), min=1.0)]
    paired = {"median": 0.96, "min": 0.90, "mean": 0.97}
    ours = [dict(_record("triton", "forward", 8192, 1.04), min=0.99, paired_floor=paired)]
    assert target_rows(floors + ours)[1][1][4] == "1.083 MISS"  # 1.04 / 0.96 (its own floor's: 1.04 ok)
    assert target_rows(floors + ours, "min")[1][1][4] == "1.1 MISS"  # 0.99 / 0.90


def test_each_ratio_divides_by_the_floor_of_its_own_dtype_mode_and_M():
    """nn.Linear's times differ by dtype, mode and M (a fwd+bwd about three times a forward): a floor looked up
    under a key missing one of them would divide a case by another case's floor."""
    cases = [(dtype, mode, M) for dtype in ("bfloat16", "float16") for mode, M in
             (("forward", 8192), ("fwd+bwd", 8192), ("forward", 1), ("forward", 16))]  # fmt: skip
    records = []
    for i, (dtype, mode, M) in enumerate(cases):
        floor = 1.0 + i  # each case's floor its own
        records += [dict(_record("nn.Linear", mode, M, floor), dtype=dtype),
                    dict(_record("triton", mode, M, 1.02 * floor), dtype=dtype)]  # fmt: skip
    headers, rows, provs = summary_rows(records)
    assert provs == ["triton"] and len(rows) == len(cases)
    assert {row[-1] for row in rows} == {"1.02"}
    rows = {tuple(row[1:4]): row for row in target_rows(records)[1]}
    assert rows["bfloat16", 16, "triton"][4:] == rows["float16", 16, "triton"][4:] == [
        "1.02 ok", "1.02 ok", "-", "1.02 ok", "3/4 met, 1 unmeasured"
    ]  # fmt: skip


def test_torch_over_ours_divides_ratios_each_against_its_own_paired_floor():
    """The third target, torch / ours at fwd+bwd: each side's time over the floor timed beside it (a clock drift
    between the two cases cancels), the raw times only where a ratio is missing."""
    floors = [_record("nn.Linear", "fwd+bwd", 8192, 1.0)]
    ours = [
        dict(_record("torch", "fwd+bwd", 8192, 1.5), paired_floor={"median": 1.0}),
        dict(_record("triton", "fwd+bwd", 8192, 1.3), paired_floor={"median": 1.2}),  # its clocks ran slower
    ]
    rows = {(row[2], row[3]): row for row in target_rows(floors + ours)[1]}
    assert rows[16, "triton"][6] == "1.385 ok"  # (1.5 / 1.0) / (1.3 / 1.2); of the raw times 1.154, a miss


def test_targets_table_has_rows_for_the_targets_shape_and_without_dropout_only():
    """Issue 3's targets are for K = N = 4096 without adapter dropout: another shape's cases (the GPU grid times
    three at M = 8192) and ``triton-dropout`` get no row of targets."""
    floors = [_record("nn.Linear", "fwd+bwd", 8192, 1.0)]
    kv = [dict(_record(p, "fwd+bwd", 8192, t), shape="llama3-8b.kv", N=1024) for p, t in
          (("nn.Linear", 0.3), ("triton", 0.5), ("torch", 0.6))]  # fmt: skip
    dropout = [_record("triton-dropout", "fwd+bwd", 8192, 1.4)]
    _, rows = target_rows(floors + kv + dropout + [_record("triton", "fwd+bwd", 8192, 1.1)])
    assert [(row[0], row[2], row[3]) for row in rows] == [
        ("llama2-7b.qkvo", 8, "triton"), ("llama2-7b.qkvo", 16, "triton"), ("llama2-7b.qkvo", 64, "triton")
    ]  # fmt: skip


def test_choice_table_divides_times_of_one_shape():
    """A cell holds one shape, M and rank: where a provider is missing at one shape (failed, cut by the time budget),
    its time at another shape is not set against the other provider's (the GPU grid runs the forced providers at
    four shapes at M = 8192 and rank 16)."""
    recs = [
        _record("triton-1pass", "forward", 8192, 1.0),
        _record("triton-2pass", "forward", 8192, 1.1),
        dict(_record("triton-1pass", "forward", 8192, 4.0), shape="llama2-7b.gate_up", N=11008),  # 2pass cut
    ]
    _, rows = choice_rows(recs)
    assert [row[4:6] for row in rows] == [[2, "1.1"]]  # two cells; one pair: 1.1 / 1.0, not 1.1 / 4.0


def test_headline_divides_ours_by_peft_at_the_same_case():
    """The headline's "triton / peft-lora" column: ours over PEFT's (each against its floor), below 1 = ours faster."""
    floors = [_record("nn.Linear", "fwd+bwd", 8192, 1.0)]
    ours = [_record("triton", "fwd+bwd", 8192, 1.2), _record("peft-lora", "fwd+bwd", 8192, 1.6)]
    ((_, headers, rows),) = _headline(floors + ours, "median", ["triton", "peft-lora"])
    assert headers[5:] == ["triton / peft-lora"] and rows[0][5:] == ["0.75"]


def test_shape_tables_give_throughput_in_tflops_and_gbs():
    from tied_lora_kernels.bench_tables import _shape_tables

    rec = dict(_record("triton", "forward", 8192, 2e-3), flops=4e9, bytes=6e6)
    (_, headers, rows), *_ = _shape_tables([rec], "median")
    assert headers[3:6] == ["time (median)", "TFLOP/s", "GB/s"] and rows[0][3:6] == ["2 ms", "2", "3"]


def test_load_keeps_each_file_s_run_and_statistics(tmp_path):
    """Two runs' JSON (a run and a partial rerun, ``--json a b``): each record keeps its file's datetime, so that a
    ratio divides by the floor of its own run, and each statistic its own value."""
    stats = dict(median=1.0, min=0.9, mean=1.1, stddev=0.1, rounds=20)
    for name, when, seconds in (("a.json", "2026-12-06T10:00", 1.0), ("b.json", "2026-12-06T10:30", 0.9)):
        bench = [dict(name="f", stats=dict(stats, median=seconds), extra_info=_record("nn.Linear", "forward", 8192, 0))]
        if name == "a.json":
            bench.append(
                dict(name="t", stats=dict(stats, median=1.04), extra_info=_record("triton", "forward", 8192, 0))
            )
        (tmp_path / name).write_text(json.dumps({"datetime": when, "benchmarks": bench}))
    records = load([tmp_path / "a.json", tmp_path / "b.json"])
    assert [r["datetime"] for r in records] == ["2026-12-06T10:00"] * 2 + ["2026-12-06T10:30"]
    assert [(r["median"], r["min"], r["mean"], r["rounds"]) for r in records[:2]] == [
        (1.0, 0.9, 1.1, 20),
        (1.04, 0.9, 1.1, 20),
    ]
    assert {(row[2], row[3]): row[4] for row in target_rows(records)[1]}[16, "triton"] == "1.04 ok"


@pytest.mark.skipif(not RESULTS, reason="no committed CPU results")
def test_the_report_reads_medians_unless_told(capsys):
    assert main(["--json", str(RESULTS[-1]), "--headline", "--no-plot"]) == 0
    assert (
        "headline: geometric mean of time ratios over shapes and M (median; below 1 = faster)"
        in capsys.readouterr().out
    )


def test_choice_table_leaves_out_a_forced_provider_that_ran_the_default_s_choice():
    """The divisor's side too: ``triton-ptr`` whose launches show TMA loads (its forcing lost), ``triton-1pass``
    that ran two-pass, would compare the default with itself and read as a tie: the pair is left out."""
    recs = [
        _record("triton", "forward", 8192, 1.0, rank=64) | {"launches": _launched(TMA=True)},
        _record("triton-ptr", "forward", 8192, 1.01, rank=64) | {"launches": _launched(TMA=True)},  # left out
        _record("triton-2pass", "forward", 8192, 0.99, rank=64) | {"launches": _launched(LOAD_T=True)},
        _record("triton-1pass", "forward", 8192, 1.0, rank=64) | {"launches": _launched(LOAD_T=False)},
        _record("triton", "forward", 8192, 1.0, rank=8) | {"launches": _launched(TMA=True)},
        _record("triton-ptr", "forward", 8192, 1.1, rank=8) | {"launches": _launched(TMA=False)},
        _record("triton-2pass", "forward", 8192, 0.99, rank=8) | {"launches": _launched(LOAD_T=True)},
        _record("triton-1pass", "forward", 8192, 1.0, rank=8) | {"launches": _launched(LOAD_T=True)},  # left out
    ]
    _, rows = choice_rows(recs)
    assert rows == [
        ["bfloat16", "prefill", 16, "forward", "1 (1 pairs left out)", "-", "one_pass", "0.909", "-", "-", "-"],
        ["bfloat16", "prefill", 64, "forward", "1 (1 pairs left out)", "0.99", "two_pass", "-", "-", "-", "-"],
    ]


def test_choice_table_takes_ratios_within_3_percent_as_ties():
    """No default is named for a change on a difference within ``_NOISE`` (3 %), in either direction, in any column."""
    recs = [
        _record("triton-1pass", "forward", 8192, 1.0, rank=8),
        _record("triton-2pass", "forward", 8192, 0.98, rank=8),  # 2 % for two-pass, where the table picks one-pass
        _record("triton", "forward", 8192, 1.02, rank=8),
        _record("triton-ptr", "forward", 8192, 1.0, rank=8),  # 2 % for pointer loads
        _record("triton", "forward", 1, 1.0, rank=8),
        _record("triton-1launch", "forward", 1, 0.98, rank=8),  # 2 % for the in-kernel sum
        _record("triton-intile", "forward", 1, 0.98, rank=8),  # 2 % for the rank-R term in every tile
    ]
    _, rows = choice_rows(recs)
    assert [row[5:] for row in rows] == [
        ["-", "one_pass", "-", "0.98", "1.02", "-"],
        ["0.98", "one_pass", "1.02", "-", "-", "-"],
    ]
