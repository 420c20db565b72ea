"""Does ptxas 12.9 corrupt the fused kernels on this Hopper GPU? gpu_check.sh's last phase.

    python -m benchmarks.ptxas_probe OUT.json

``kernels.hopper_ptxas`` keeps the kernels from being assembled for Hopper by ptxas 12.9-13.2, which can reuse the
registers of a ``wgmma`` reading its ``A`` operand from registers before the ``wgmma`` has read them (triton PR
11781): every 16-bit prefill GEMM has one, the rank-R term's dot. Whether it actually corrupts these kernels is
unknown. This runs the small-integer exactness tests (every output and gradient must equal float64 bit for bit)
in child pytest processes (``GPU_CHECK_PROCS`` of them, as gpu_check's other phases) whose triton assembles with
such a ptxas bundled with triton (triton 3.6's ``ptxas-blackwell`` is 12.9, triton 3.8's ``ptxas``), with the guard
off (this module is also the children's pytest plugin) and an empty triton cache, and records what happened:
``exact`` or ``CORRUPT`` (the failing tests), with the triton version whose code was assembled. Only ``CORRUPT``
settles anything: a register race may pass a run, and triton 3.6's code is not triton 3.8's. A measurement, not a
check: the exit status is 0 either way (and on a GPU that is not a Hopper, or with no such ptxas at hand, it says
so and stops).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

TESTS = [
    "tests/test_kernels_parity.py::test_small_integers_are_exact",
    "tests/test_kernels_strategies.py::test_small_integers_are_exact",
]


def pytest_configure(config) -> None:
    # a child's plugin: the guard off, so that triton assembles with the ptxas TRITON_PTXAS_PATH names
    from tied_lora_kernels import kernels

    kernels.hopper_ptxas = lambda: None


def pytest_sessionfinish(session) -> None:
    from triton.backends.nvidia import compiler

    from tied_lora_kernels.kernels.ptxas import _ptxas

    print(f"\nptxas_probe: sm_90 assembled by ptxas {_ptxas(compiler, 90).version}", flush=True)


def _affected_ptxas():
    """A ptxas bundled with triton that can corrupt a register-input ``wgmma`` (``kernels.ptxas``), or None."""
    from triton import knobs

    from tied_lora_kernels.kernels.ptxas import affected

    for name in ("ptxas", "ptxas_blackwell"):
        try:
            tool = getattr(knobs.nvidia, name)
        except (AttributeError, RuntimeError):
            continue
        if affected(tool.version):
            return tool
    return None


def probe(tool, tests: list[str] = TESTS) -> dict:
    """Run ``tests`` in child pytest processes whose triton assembles sm_90 kernels with ``tool`` (a ``NvidiaTool``),
    guard off, triton cache empty; what happened."""
    with tempfile.TemporaryDirectory() as cache:
        # (triton < 3.9 takes Hopper's ptxas from the first, 3.9 from the second)
        env = {**os.environ, "TRITON_PTXAS_PATH": tool.path, "TRITON_PTXAS_BLACKWELL_PATH": tool.path}
        procs = ["-n", os.environ["GPU_CHECK_PROCS"]] if os.environ.get("GPU_CHECK_PROCS") else []
        command = [sys.executable, "-m", "benchmarks.parallel_pytest", *procs, "--", "-p", "benchmarks.ptxas_probe"]
        command += tests
        proc = subprocess.run([*command, "-q", "-p", "no:cacheprovider"], env={**env, "TRITON_CACHE_DIR": cache},
                              capture_output=True, text=True)  # fmt: skip
    # (the children's output goes into the JSON, not the log's end: the device tool's reply keeps only that)
    used = sorted(set(re.findall(r"ptxas_probe: sm_90 assembled by ptxas (\S+)", proc.stdout)))
    failed = sorted(set(re.findall(r"FAILED (\S+)", proc.stdout)))
    result = {"ptxas": tool.version, "path": tool.path, "assembled_by": used, "rc": proc.returncode, "failed": failed}
    result.update(stdout_tail=proc.stdout[-6000:], stderr_tail=proc.stderr[-2000:])
    if used != [tool.version]:
        result["result"] = f"inconclusive: the children assembled with {used}"
    elif proc.returncode == 0:
        result["result"] = "exact"
    elif failed:
        result["result"] = f"CORRUPT: {len(failed)} tests not exact"
    else:
        result["result"] = f"inconclusive: pytest exited {proc.returncode}"
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else "ptxas_probe.json"
    import torch
    import triton

    result = {"triton": triton.__version__, "torch": torch.__version__}
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        result["result"] = "skipped: not a Hopper GPU"
    else:
        for name in ("TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH"):  # (the bundled tools, not a choice)
            os.environ.pop(name, None)
        tool = _affected_ptxas()
        if tool is None:
            result["result"] = "skipped: triton bundles no ptxas 12.9-13.2"
        else:
            result.update(probe(tool), device=torch.cuda.get_device_name())
    print(f"ptxas probe (ptxas {result.get('ptxas', '-')} on triton {result['triton']}'s code): {result['result']}")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
