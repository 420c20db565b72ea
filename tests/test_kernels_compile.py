"""Every kernel config the library can launch compiles for its GPU architecture with zero register spills.

Runs ``python -m tied_lora_kernels.kernels.compile_check`` in a subprocess with ``TRITON_INTERPRET``
unset (under the interpreter ``triton.jit`` cannot compile), ahead of time, no GPU needed: each config of
``kernels/configs.py`` for sm_90 or sm_80 (the table it belongs to), each launch variant (forward and dx of
both strategies, their split-K forms at decode, the two-pass shrink of x and of dy, and the two
rank-gradient reductions), bf16 for the 16-bit configs and fp32 for the 32-bit ones. The table
(registers, spills, shared memory, wgmma) is printed; run pytest with ``-s`` to see it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tied_lora_kernels.kernels import configs

pytest.importorskip("triton.backends.nvidia", reason="triton's NVIDIA backend (bundled ptxas) is not installed")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "tied_lora_kernels.kernels.compile_check", "--jobs", "2", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(proc.stdout)
    assert out.exists(), f"compile check produced no rows (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def test_every_shipped_config_is_compiled(rows):
    compiled = {(r["name"], r["variant"]) for r in rows}
    expected = set()
    for _, cfg, _, _ in configs.all_fused_configs():  # both strategies; split-K variants where a config splits
        expected |= {(cfg.name, v) for v in ("fwd", "dx") + (("fwd-splitk", "dx-splitk") if cfg.split_k else ())}
    expected |= {(cfg.name, v) for _, cfg, _, _ in configs.all_shrink_configs() for v in ("T", "dS")}
    expected |= {(cfg.name, v) for _, cfg, _, _ in configs.all_rank_grad_configs() for v in ("G", "dA")}
    assert expected <= compiled, f"not compiled: {sorted(expected - compiled)}"


def test_no_register_spills(rows):
    spilling = [f"{r['variant']} {r['name']} {r['dtype']}: {r['spill_bytes']} B" for r in rows if r["spill_bytes"]]
    assert not spilling, "register spills:\n" + "\n".join(spilling)


def test_shared_memory_fits(rows):
    over = [
        f"{r['variant']} {r['name']}: {r['shared']} > {r['shared_limit']}"
        for r in rows
        if r["shared"] > r["shared_limit"]
    ]
    assert not over, "shared memory over the limit:\n" + "\n".join(over)


def test_hopper_tiles_use_wgmma(rows):
    # the 16-bit prefill tiles (64+ rows, both strategies) and the 16-bit shrink must use Hopper's wgmma on
    # sm_90, not the Ampere mma fallback
    hopper = [r for r in rows if r["arch"] == "sm90" and ("prefill-16bit" in r["name"] or "shrink-16bit" in r["name"])]
    assert hopper
    assert all(r["wgmma"] for r in hopper), [r["name"] for r in hopper if not r["wgmma"]]
