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
