"""``python -m tied_lora_kernels``: what runs here, whether it is right, and what each preset costs.

Prints the backends available on this machine, a parity check of each against the float64 reference
(forward and every gradient), and the trainable parameters of every preset on LLaMA-2-7B's QKV
projections (built on the meta device: no weights, no download). Exits non-zero if a check fails.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from torch import nn

from tied_lora_kernels import kernels, reference
from tied_lora_kernels.config import PRESETS, QKV, TiedLoRAConfig
from tied_lora_kernels.functional import tied_lora_linear
from tied_lora_kernels.model import apply_tied_lora, count_parameters

# error bound relative to the output's magnitude, per compute dtype (a parity check, not the test suite)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def parity(backend: str, device: str, dtype: torch.dtype, seed: int = 0) -> float:
    """Max relative error of the output and every gradient (x, W, b, A, B, u, v) against float64."""
    g = torch.Generator().manual_seed(seed)
    M, K, N, R = 37, 48, 40, 8
    shapes = {"x": (M, K), "weight": (N, K), "bias": (N,), "A": (R, K), "B": (N, R), "u": (R,), "v": (N,)}
    base = {k: torch.randn(s, generator=g) / (K**0.5 if k in ("weight", "A") else 1) for k, s in shapes.items()}
    dy = torch.randn(M, N, generator=g)

    def run(dt, fn, **kw):
        # the base layer in the compute dtype, adapters as float32 masters (float64 for the reference)
        adapter_dt = torch.float64 if dt == torch.float64 else torch.float32
        ins = {
            k: t.to(device, dt if k in ("x", "weight", "bias") else adapter_dt).clone().requires_grad_()
            for k, t in base.items()
        }
        y = fn(ins["x"], ins["weight"], ins["bias"], ins["A"], ins["B"], ins["u"], ins["v"], 0.5, **kw)
        y.backward(dy.to(device, y.dtype))
        return [y] + [ins[k].grad for k in shapes]

    got = run(dtype, tied_lora_linear, backend=backend)
    want = run(torch.float64, reference.tied_lora_forward, upcast=True)
    return max(
        ((a.double() - b.double()).abs().max() / b.abs().max().clamp(min=1.0)).item()
        for a, b in zip(got, want, strict=True)
    )


def _interpreter_parity() -> str:
    """The triton kernels on this CPU through triton's interpreter, in a child process (the variable
    TRITON_INTERPRET must be set before triton is imported)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "from tied_lora_kernels.selfcheck import parity; print(parity('triton', 'cpu', __import__('torch').float32))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    return proc.stdout.strip().splitlines()[-1]


def qkv_skeleton(layers: int = 32, d: int = 4096) -> nn.Module:
    """LLaMA-2-7B's adapted projections: ``layers.{i}.self_attn.{q,k,v}_proj``, d → d, on the meta device."""

    def attention():
        return nn.ModuleDict({name: nn.Linear(d, d, bias=False, device="meta") for name in QKV})

    return nn.ModuleDict({"layers": nn.ModuleList(nn.ModuleDict({"self_attn": attention()}) for _ in range(layers))})


def main() -> int:
    print(f"tied_lora_kernels self-check — torch {torch.__version__}", end="")
    try:
        import triton

        print(f", triton {triton.__version__}")
    except ImportError:
        print(", triton not installed")

    rows = [("torch", "cpu", torch.float32)]
    gpu_reason = kernels.unavailable_reason(torch.device("cuda")) if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        rows += [("torch", "cuda", dt) for dt in (torch.float32, torch.bfloat16)]
        if gpu_reason is None:
            rows += [("triton", "cuda", dt) for dt in (torch.float32, torch.float16, torch.bfloat16)]
    failures = 0
    print("\nparity against the float64 reference (output and all 7 gradients, max relative error)")
    print(f"  {'backend':<22} {'device':<6} {'dtype':<9} {'error':>9}  result")
    for backend, device, dtype in rows:
        err = parity(backend, device, dtype)
        ok = err <= TOLERANCE[dtype]
        failures += not ok
        print(f"  {backend:<22} {device:<6} {str(dtype)[6:]:<9} {err:>9.2e}  {'ok' if ok else 'FAIL'}")
    if gpu_reason is not None:  # (a GPU the kernels cannot run on: said, not hidden)
        print(f"  {'triton':<22} {'cuda':<6} {'-':<9} {'-':>9}  skipped: {gpu_reason}")
    if not torch.cuda.is_available():
        reason = kernels.unavailable_reason(torch.device("cuda"))
        label = f"  {'triton (interpreter)':<22} {'cpu':<6} {'float32':<9}"
        try:
            import triton  # noqa: F401
        except ImportError:
            print(f"{label} {'-':>9}  skipped: triton is not installed")
        else:
            try:
                err = float(_interpreter_parity())
                ok = err <= TOLERANCE[torch.float32]
                failures += not ok
                print(f"{label} {err:>9.2e}  {'ok' if ok else 'FAIL'}")
            except Exception as exc:  # noqa: BLE001 - report, don't hide: counted as a failure
                failures += 1
                print(f"{label} {'-':>9}  FAIL: {exc}")
            print(f"  (no GPU here: {reason}; the fused kernels were checked in triton's CPU interpreter)")

    print("\ntrainable parameters, LLaMA-2-7B QKV (32 layers, d = 4096, q/k/v grouped), rank 8")
    print(f"  {'preset':<7} {'tied':<5} {'trains':<8} {'trainable':>11} {'% of LoRA':>10}")
    counts = {}
    for preset in PRESETS:
        config = TiedLoRAConfig(rank=8, preset=preset)
        counts[preset] = count_parameters(apply_tied_lora(qkv_skeleton(), config)).trainable
        r = config.resolved
        trains = "".join(k for k in "ABuv" if r[f"train_{k}"])
        pct = 100 * counts[preset] / counts["lora"]
        print(f"  {preset:<7} {'yes' if r['tie'] else 'no':<5} {trains:<8} {counts[preset]:>11,} {pct:>9.2f}%")
    print("\nall checks passed" if not failures else f"\n{failures} check(s) FAILED")
    return 1 if failures else 0
