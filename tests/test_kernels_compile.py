"""Every kernel config the library can launch compiles for every GPU it runs on with zero register spills.

Reads the rows of ``python -m tied_lora_kernels.kernels.compile_check``, which ``tests/conftest.py`` starts in a
subprocess with ``TRITON_INTERPRET`` unset (under the interpreter ``triton.jit`` cannot compile) as soon as the
session is collected, and runs these tests last: the rest of the suite runs alongside it. Ahead of time, no GPU
needed: each config of
``kernels/configs.py`` for each GPU its table is given to (the sm90 table: Hopper sm_90 and datacenter Blackwell
sm_100; the sm80 table: Ampere sm_80 and consumer Blackwell sm_120), each launch variant (forward and dx of both
strategies, the decode forward for ranks that are and are not multiples of 16, their split-K forms with the
partials summed by the sum kernel or in the GEMM's own launch (``-reduce``) and, one-pass, with the rank-R term
apart (``-apart``: rank programs store each slice's ``t``; ``-apart-sum``: the sum launch that expands it), the
split-K sum, the two-pass shrink of x and of dy, the two rank-gradient reductions, the adapters' preparation,
and with adapter dropout (``-dropout``) the shrink drawing the mask, the two-pass dx GEMM and ``dA``), bf16 for
the 16-bit configs and fp32 for the 32-bit ones; the 16-bit prefill configs of the sm90 table also with their
tiles loaded through TMA descriptors (``-tma``) for Hopper, as the launcher passes them there; the tiles for
widths that are not multiples of 16 with no divisibility hints at all (``-unaligned``). The table (registers,
spills, shared memory, tensor-core instruction, loads) is printed; run pytest with ``-s`` to see it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tied_lora_kernels import kernels
from tied_lora_kernels.kernels import compile_check, configs

pytest.importorskip("triton.backends.nvidia", reason="triton's NVIDIA backend (bundled ptxas) is not installed")


@pytest.fixture(scope="module")
def rows(compile_check_rows):
    # run by tests/conftest.py in the background from the start of the session (these tests go last)
    return compile_check_rows


TARGETS = {"sm90": ("sm_90", "sm_100"), "sm80": ("sm_80", "sm_120")}


def _launched(monkeypatch, *, dropout: bool):
    """``(fused, shrink)``: the ``(arch, config)`` pairs that launches with or without adapter dropout get from
    ``configs.fused_config`` and ``configs.shrink_config``, over every table, regime, width, rank tile, strategy
    and alignment."""
    fused, shrink = set(), set()
    for arch in configs.ARCHS:
        monkeypatch.setattr(configs, "arch_of", lambda device, arch=arch: arch)
        for dtype in (torch.bfloat16, torch.float32):
            for block_r in configs.BLOCK_RS:
                for aligned in (True, False):
                    for M in (1, 64):  # decode, prefill
                        for strategy in ("two_pass",) if dropout else configs.STRATEGIES:
                            cfg = configs.fused_config(M, block_r, dtype, DEVICE, strategy, aligned, dropout=dropout)
                            fused.add((arch, cfg))
                    shrink.add((arch, configs.shrink_config(block_r, dtype, DEVICE, aligned, dropout=dropout)))
    monkeypatch.undo()
    return fused, shrink


DEVICE = torch.device("cpu")  # (arch_of is patched: the device only has to exist)


def _split_variants(cfg, variants: list[str]) -> list[str]:
    """Split-K forms: partials summed by the sum launch, or in the kernel by each tile's last slice; one-pass
    also with the rank-R term apart (``forcing.split_rank``): the GEMM and its sum launch."""
    out = [f"{v}-splitk{r}" for r in ("", "-reduce") for v in variants]
    if cfg.strategy == "one_pass":
        out += [f"{v}-splitk-apart{r}" for r in ("", "-sum") for v in variants]
    return out


def test_every_shipped_config_is_compiled_for_every_target(rows, monkeypatch):
    compiled = {(r["name"], r["variant"], r["target"]) for r in rows}
    expected = set()
    fused, shrink = _launched(monkeypatch, dropout=False)
    assert {(arch, cfg) for arch, cfg, _, _ in configs.all_fused_configs()} >= fused
    for arch, cfg in fused:  # both strategies
        if not cfg.aligned:  # tiles for widths that are not multiples of 16: compiled without any hints
            variants = ["fwd-unaligned", "dx-unaligned"]
            variants += _split_variants(cfg, variants) if cfg.split_k else []
            expected |= {(cfg.name, v, t) for v in variants for t in TARGETS[arch]}
            continue
        variants = ["fwd", "dx"]
        if "-decode-" in cfg.name:  # the decode forward reads B as stored: its row stride may be unaligned
            variants.append("fwd-oddR")
        if cfg.split_k:
            variants += _split_variants(cfg, variants)
        expected |= {(cfg.name, v, t) for v in variants for t in TARGETS[arch]}
        if "-prefill-16bit" in cfg.name:  # loaded through TMA descriptors on the GPUs that do
            tma = [t for t in TARGETS[arch] if int(t.removeprefix("sm_")) // 10 in configs.TMA_MAJORS]
            expected |= {(cfg.name, v, t) for v in ("fwd-tma", "dx-tma") for t in tma}
    for arch, cfg in shrink:
        variants = ("T", "dS") if cfg.aligned else ("T-unaligned", "dS-unaligned")
        expected |= {(cfg.name, v, t) for v in variants for t in TARGETS[arch]}
    for arch, cfg, _, _ in configs.all_rank_grad_configs():
        expected |= {(cfg.name, v, t) for v in ("G", "dA", "dA-dropout") for t in TARGETS[arch]}
    # adapter dropout: dx's GEMM masking its rank-R term (two-pass), the shrink drawing the mask
    fused, shrink = _launched(monkeypatch, dropout=True)
    for arch, cfg in fused:
        assert cfg.strategy == "two_pass"
        variants = ["dx-dropout" if cfg.aligned else "dx-dropout-unaligned"]
        if cfg.split_k:
            variants += [f"{variants[0]}-splitk{r}" for r in ("", "-reduce")]
        expected |= {(cfg.name, v, t) for v in variants for t in TARGETS[arch]}
        if "-prefill-16bit" in cfg.name and cfg.aligned:
            tma = [t for t in TARGETS[arch] if int(t.removeprefix("sm_")) // 10 in configs.TMA_MAJORS]
            expected |= {(cfg.name, "dx-dropout-tma", t) for t in tma}
    for arch, cfg in shrink:
        expected |= {(cfg.name, "T-dropout" if cfg.aligned else "T-dropout-unaligned", t) for t in TARGETS[arch]}
    for arch in {arch for arch, cfg, _, _ in configs.all_fused_configs() if cfg.split_k}:
        expected |= {(f"{arch}-splitk-sum", "sum", t) for t in TARGETS[arch]}
    for arch in configs.ARCHS:
        expected |= {(f"{arch}-prepare", "prep", t) for t in TARGETS[arch]}
    assert {r["dtype"] for r in rows if r["variant"] == "prep"} == {"bfloat16", "float32"}
    assert expected <= compiled, f"not compiled: {sorted(expected - compiled)}"
    # one-pass split-K in each output tile scales its partial t into fp16's range: fp16 compiles other code
    in_tile = {(r["name"], r["variant"], r["target"]) for r in rows if _in_tile_split(r)}
    fp16 = {(r["name"], r["variant"], r["target"]) for r in rows if r["dtype"] == "float16"}
    assert in_tile and in_tile <= fp16, f"not compiled for fp16: {sorted(in_tile - fp16)}"


def _in_tile_split(row: dict) -> bool:
    one_pass = row["name"] in {cfg.name for _, cfg, _, _ in configs.all_fused_configs() if cfg.strategy == "one_pass"}
    return one_pass and "-splitk" in row["variant"] and "-apart" not in row["variant"]


@pytest.mark.parametrize("cc", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0), (12, 1)], ids=str)
def test_each_gpu_gets_a_table_compiled_for_its_architecture(monkeypatch, cc):
    # configs.arch_of picks the table a GPU runs; the compile check must build that table for the GPU's major
    # architecture (sm_8x runs sm_80 code; sm_103 the sm_100 family's)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    monkeypatch.setattr(kernels, "hopper_ptxas", lambda: None)  # (the installed triton's Hopper ptxas: not this test's)
    configs._cuda_capability.cache_clear()  # arch_of caches each GPU's answer
    try:
        table = configs.arch_of(torch.device("cuda", 0))
    finally:
        configs._cuda_capability.cache_clear()
    assert any(target // 10 == cc[0] for target in compile_check.TARGETS[table]), (cc, table)


def test_every_compile_succeeded(rows):
    failed = [f"{r['variant']} {r['name']} {r['target']}: {r['error']}" for r in rows if r.get("error")]
    assert not failed, "compile failed:\n" + "\n".join(failed)


def test_registers_are_those_of_the_jit_build(rows):
    # the registers and spills must come from the ptxas -v log of triton's own build, as the JIT runs it: triton 3.9
    # passes --regAllocOptLevel=2, under which 11 rows spilled 8-48 bytes that a separate ptxas run passed.
    # Triton prints that log from 3.5 on; before, the check runs ptxas itself
    from triton import __version__

    if kernels.release(__version__) < compile_check.PRINTS_PTXAS_LOG:
        pytest.skip(f"triton {__version__} does not print its ptxas log")
    assert {r["ptxas_log"] for r in rows if not r.get("error")} == {"triton"}


def test_hopper_rows_are_assembled_as_a_launch_will(monkeypatch):
    # where triton's Hopper ptxas can corrupt the rank-R term's register-input wgmma (triton 3.8's 12.9), a launch
    # assembles with triton's bundled newer one (kernels.hopper_ptxas): so do the check's sm_90 rows, and only those
    from triton.backends.nvidia import compiler
    from triton.knobs import NvidiaTool

    def get_ptxas(arch=80):
        chosen = os.environ.get("TRITON_PTXAS_PATH")
        return NvidiaTool(chosen, "13.3") if chosen else NvidiaTool("/triton/bin/ptxas", "12.9")

    monkeypatch.delenv("TRITON_PTXAS_PATH", raising=False)
    monkeypatch.setattr(compiler, "get_ptxas", get_ptxas)
    bundled = NvidiaTool("/triton/bin/ptxas-blackwell", "13.3")
    monkeypatch.setattr(kernels.ptxas, "_hopper_ptxas_choice", lambda driver: ("risk", bundled, None))
    with compile_check._assembler(90) as version:
        assert version == "13.3" and os.environ["TRITON_PTXAS_PATH"] == "/triton/bin/ptxas-blackwell"
    assert "TRITON_PTXAS_PATH" not in os.environ
    for arch in (80, 100, 120):
        with compile_check._assembler(arch) as version:
            assert version == "12.9" and "TRITON_PTXAS_PATH" not in os.environ
    monkeypatch.setattr(kernels.ptxas, "_hopper_ptxas_choice", lambda driver: (None, None, None))  # safe: no change
    with compile_check._assembler(90) as version:
        assert version == "12.9" and "TRITON_PTXAS_PATH" not in os.environ


def test_the_rows_name_their_assembler(rows):
    for target, arch in (("sm_80", 80), ("sm_90", 90)):
        with compile_check._assembler(arch) as version:
            assert {r["ptxas"] for r in rows if r["target"] == target and not r.get("error")} == {version}


def test_jobs_compiled_once_are_given_the_same_compile(monkeypatch):
    # the check compiles each key's first job and gives every job of the key its row: the jobs of one key must
    # be given the same triton.compile inputs, and jobs of two keys different ones (or a compile is repeated)
    import triton.compiler

    given = []

    def fake_compile(source, target, options):
        given.append(repr((source, target, sorted(options.items()))))
        print("ptxas info    : Used 1 registers")  # (what compile_one reads from the ptxas log)
        return SimpleNamespace(asm={"ptx": ""}, metadata=SimpleNamespace(shared=0))

    monkeypatch.setattr(triton.compiler, "ASTSource", lambda *args: (args[0].__name__, *map(_sorted_items, args[1:])))
    monkeypatch.setattr(triton, "compile", fake_compile)
    monkeypatch.setattr(compile_check, "_assembler", lambda arch: contextlib.nullcontext("-"))
    jobs = compile_check.jobs(full=True)
    jobs += [dict(job, switches=dict.fromkeys(compile_check.SWITCHES, False)) for job in jobs[::5]]  # (--off)
    for job in jobs:
        compile_check.compile_one(job)
    by_key: dict[tuple, set[str]] = {}
    for job, inputs in zip(jobs, given, strict=True):
        by_key.setdefault(compile_check._key(job), set()).add(inputs)
    assert all(len(inputs) == 1 for inputs in by_key.values())
    assert len(by_key) == len(set(given)) < len(jobs)


def _sorted_items(mapping: dict) -> list:
    return sorted(mapping.items(), key=repr)


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_the_check_runs_under_every_start_method(start_method):
    # its compile workers die with their parent: under forkserver (Python 3.14's default) that parent is the fork
    # server, not the check (a first version took the check's pid for theirs, and every worker exited at once)
    code = (
        f"import multiprocessing, sys; multiprocessing.set_start_method({start_method!r}, force=True); "
        "from tied_lora_kernels.kernels import compile_check; "
        "sys.exit(compile_check.main(['--only', 'sm80-prepare', '--targets', '80', '--jobs', '2']))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # both rows compiled, their registers read from triton's own log (triton >= 3.5), else from the check's ptxas run
    from triton import __version__

    counted = re.search(r"triton's own build: (\d+) rows; .*: (\d+) rows", proc.stdout)
    expected = (2, 0) if kernels.release(__version__) >= compile_check.PRINTS_PTXAS_LOG else (0, 2)
    assert counted and (int(counted[1]), int(counted[2])) == expected, proc.stdout[-2000:]


def test_switches_can_be_compiled_off(tmp_path):
    # --off: the specialisations of a layer without a bias, u or v (run by hand: benchmarks/results/README.md)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "tied_lora_kernels.kernels.compile_check", "--jobs", "2", "--targets", "80"]
    out = tmp_path / "rows.json"
    off = ["--off", "HAS_BIAS,HAS_RSCALE,HAS_CSCALE", "--json", str(out), "--only", "sm80-decode-fp32-r16"]
    proc = subprocess.run([*command, *off], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {r["variant"] for r in rows} == {"fwd", "fwd-oddR", "dx"}
    assert all(r["switches"] == dict.fromkeys(("HAS_BIAS", "HAS_RSCALE", "HAS_CSCALE"), False) for r in rows)
    proc = subprocess.run([*command, "--off", "HAS_U"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--off takes HAS_BIAS, HAS_RSCALE, HAS_CSCALE, got 'HAS_U'" in proc.stderr


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


@pytest.mark.parametrize("target,instruction", [("sm_90", "wgmma"), ("sm_100", "tcgen05")])
def test_big_tiles_use_the_architecture_tensor_cores(rows, target, instruction):
    # the 16-bit prefill tiles (64+ rows, both strategies) and the 16-bit shrink must use Hopper's wgmma on
    # sm_90 and Blackwell's tcgen05 on sm_100, not the Ampere mma.sync fallback
    big = [r for r in rows if r["target"] == target and ("prefill-16bit" in r["name"] or "shrink-16bit" in r["name"])]
    assert big
    assert all(r["mma"] == instruction for r in big), [(r["name"], r["mma"]) for r in big if r["mma"] != instruction]


def test_tma_variants_load_through_tma(rows):
    # the -tma rows must issue TMA copies (cp.async.bulk.tensor) and the pointer rows must not, and no sm_90
    # row may serialize its wgmma (ptxas warning C7515, which costs the pipelining)
    tma = [r for r in rows if r["variant"].endswith("-tma")]
    assert tma and all(r["tma"] > 0 for r in tma), [r["name"] for r in tma if not r["tma"]]
    assert all(r["tma"] == 0 for r in rows if not r["variant"].endswith("-tma"))
    serialized = [f"{r['variant']} {r['name']}" for r in rows if r["target"] == "sm_90" and r["serialized_wgmma"]]
    assert not serialized, serialized
