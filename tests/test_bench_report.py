"""The benchmark report (``python -m tied_lora_kernels bench --json ...``) reads a committed pytest-benchmark
JSON and prints the tables the GPU check ends with; the benchmarks themselves run outside the test suite."""

from pathlib import Path

import pytest

from tied_lora_kernels.bench import main

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
