#!/usr/bin/env bash
# One-shot GPU check: environment, kernel parity tests (fail fast), the benchmark suite, the kernels'
# register/spill report, and a short summary printed last. Run from anywhere; no installs needed:
#
#     bash benchmarks/gpu_check.sh OUT_DIR        # or: OUT=OUT_DIR bash benchmarks/gpu_check.sh
#
# Writes 7 files (8 with the opt-in compile check), OUT_DIR/gpu_check.log (everything printed), parity_margins.jsonl,
# bench_linear.json, bench_e2e.json, bench_eager.json, bench.md and ptxas_probe.json (the device tool brings back at
# most 8 files; the plot is drawn later from the JSON: python -m tied_lora_kernels.bench --json ... --plot F). Each
# phase runs under `timeout`, so one that hangs or runs long costs its limit and no more, and within
# GPU_CHECK_DEADLINE_S (default 570 s) of the start: a phase gets at most the time left before it less 50 s (the
# summary's 40 s and 10 s of grace; the timed benchmarks less 80 s, so that the report still runs), and is skipped
# with under 15 s. The limits add up to 510 s before the summary (up
# to 40 s) and 45 s after it (on a Hopper GPU, the ptxas probe); a warm run takes far less; the CPU dry run,
# GPU_CHECK_PROCS=2, ~6 minutes. Give it a tool time limit of at least the deadline plus 20 s (a killed phase's grace),
# e.g. `run` with timeout_s 595, and GPU_CHECK_COMMIT=<hash> (the copied tree may have no .git): the log names the code
# it ran.
# A cold run JIT-compiles about a thousand kernel specialisations, about a second each on one core, so the
# parity tests and an untimed warm-up of every benchmark case run as GPU_CHECK_PROCS parallel pytest
# processes (default one per core, at most 16) taking the tests from a shared queue
# (benchmarks/parallel_pytest.py; benchmarks/count_specialisations.py estimates on a CPU how long the parity
# phase compiles); the timed benchmarks then run alone, from a warm triton and inductor
# cache, with BENCH_TIME_BUDGET_S so they skip what is left and still write their JSON.
# GPU_CHECK_BENCH_ARGS (e.g. "-k llama3", split as a shell would: "-k 'llama3 and M16'") is passed to every
# benchmark run; GPU_CHECK_ONLY="bench-warmup bench-linear report" runs only the phases it names (a short rerun;
# a fresh machine's caches are cold, hence the warm-up);
# GPU_CHECK_SANITIZE=1 (or GPU_CHECK_ONLY="sanitize") adds a compute-sanitizer memcheck of the kernel tests;
# GPU_CHECK_COMPILE=1 (or GPU_CHECK_ONLY="compile-check") the ahead-of-time compile check of this GPU's family (the
# CPU machine compiles the same rows with the same ptxas).
set -euo pipefail
T0=$(date +%s)
DEADLINE_S="${GPU_CHECK_DEADLINE_S:-570}"
WORK="$(mktemp -d)" # what the summary reads and the device tool need not bring back (it brings back 8 files)

OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET # a GPU check runs the compiled kernels, never the CPU interpreter
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

# close our end of the pipe and let tee write its last lines before the script exits
finish() {
    exec 1>&- 2>&-
    for _ in $(seq 50); do kill -0 "$TEE_PID" 2>/dev/null || break; sleep 0.1; done
    exit "$1"
}

# the GPU image's interpreter is python3 (a plain "python" may not exist there)
PY="${PYTHON:-$(command -v python3 || echo python)}"
# GPU_CHECK_BENCH_ARGS split as a shell would (quotes kept together); a quote left open stops the check here
BENCH_ARGS=()
if [ -n "${GPU_CHECK_BENCH_ARGS:-}" ]; then
    "$PY" -c 'import os, shlex, sys; sys.stdout.write("\0".join(shlex.split(os.environ["GPU_CHECK_BENCH_ARGS"])))' \
        >"$WORK/bench_args"
    mapfile -d '' -t BENCH_ARGS <"$WORK/bench_args"
fi
STATUS=()
FAILED=0

# phase NAME SECONDS CMD...: run CMD under a time limit, record its outcome, never abort the script
phase() {
    local name="$1" limit="$2" start rc
    shift 2
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then
        STATUS+=("$(printf '%-14s %-16s %4ss' "$name" "not selected" 0)")
        return
    fi
    # the deadline: at most the time left less RESERVE_S (default 50: the summary's 40 s, a killed phase's grace)
    local left=$((DEADLINE_S - ($(date +%s) - T0) - ${RESERVE_S:-50}))
    if [ "$left" -lt 15 ]; then
        echo
        echo "=== $name: skipped, ${left}s left before GPU_CHECK_DEADLINE_S=${DEADLINE_S} less the summary's share"
        FAILED=1
        STATUS+=("$(printf '%-14s %-16s %4ss' "$name" "NO TIME LEFT" 0)")
        return
    fi
    if [ "$left" -lt "$limit" ]; then
        # a benchmark phase's own budget shrinks with it: it skips what is left and writes its JSON in time
        if [ -n "${BENCH_TIME_BUDGET_S:-}" ]; then
            BENCH_TIME_BUDGET_S=$((BENCH_TIME_BUDGET_S + left - limit))
            [ "$BENCH_TIME_BUDGET_S" -ge 5 ] || BENCH_TIME_BUDGET_S=5
        fi
        limit=$left
    fi
    echo
    local cmd="$*"
    cmd="${cmd//$'\n'/ }"
    echo "=== $name (limit ${limit}s): ${cmd:0:200}"
    start=$(date +%s)
    set +e
    timeout -k 10 "$limit" "$@"
    rc=$?
    set -e
    local took=$(($(date +%s) - start))
    local what="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        what="TIMED OUT"
    elif [ "$rc" -eq 5 ]; then
        what="NO TESTS (rc=5)"
        # a benchmark phase whose every case GPU_CHECK_BENCH_ARGS deselected (e.g. -k llama3) is not a failure
        if [[ "$name" == bench-* ]] && [ -n "${GPU_CHECK_BENCH_ARGS:-}" ]; then
            what="none selected"
        fi
    elif [ "$rc" -ne 0 ]; then
        what="FAILED (rc=$rc)"
    fi
    [ "$what" = "ok" ] || [ "$what" = "none selected" ] || FAILED=1
    echo "=== $name: $what in ${took}s"
    STATUS+=("$(printf '%-14s %-16s %4ss' "$name" "$what" "$took")")
}

echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(pwd), output in $OUT_DIR, deadline ${DEADLINE_S}s"
echo "commit: ${GPU_CHECK_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (no .git; set GPU_CHECK_COMMIT)")}"

# clocks, power and throttling, before and after the timed runs (a ratio near a bound can be a clock's drift)
gpu_state() {
    echo "--- GPU state ($1):"
    local query=name,driver_version,compute_mode,power.limit,power.draw,temperature.gpu
    query+=,clocks.sm,clocks.max.sm,clocks.mem,clocks_throttle_reasons.active
    timeout 10 nvidia-smi --query-gpu="$query" --format=csv 2>&1 || echo "nvidia-smi: not available"
}

ENV_PY='
import os, platform, subprocess
lines = []
try:
    lines.append(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout.strip())
except (OSError, subprocess.TimeoutExpired) as e:
    lines.append(f"nvidia-smi -L: not available: {e}")
import torch
lines.append(f"python {platform.python_version()} | torch {torch.__version__} | cuda {torch.version.cuda}")
try:
    import triton
    lines.append(f"triton {triton.__version__}")
    try:  # the assemblers of sm_80 and sm_90 kernels; on Hopper the kernels get the one kernels.hopper_ptxas picks
        from tied_lora_kernels.kernels.ptxas import _driver_cuda, _hopper_ptxas_choice, _ptxas
        from triton.backends.nvidia import compiler
        hopper = _ptxas(compiler, 90).version
        risk, newer, problem = _hopper_ptxas_choice(_driver_cuda())
        hopper += f" -> {newer.version} for the kernels" if newer else " (refused for the kernels)" if problem else ""
        lines[-1] += f" | ptxas {_ptxas(compiler, 80).version} (sm_80), {hopper} (sm_90)"
    except Exception as e:
        lines.append(f"ptxas: not reported: {type(e).__name__}: {e}")
except ImportError:
    lines.append("triton: not installed")
name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
lines.append(f"cuda available: {torch.cuda.is_available()} {name}")
print("\n".join(lines))
with open(os.environ["GPU_CHECK_ENV"], "w") as f:
    f.write("\n".join(lines) + "\n")
'
# 40 s: a cold first import of torch took 16 s in a CPU dry run (a fresh machine reads it from disk)
GPU_CHECK_ENV="$WORK/env.txt" phase env 40 "$PY" -c "$ENV_PY"
gpu_state "at the start"

PARALLEL=("$PY" -m benchmarks.parallel_pytest ${GPU_CHECK_PROCS:+-n "$GPU_CHECK_PROCS"} --)

# the kernel tests on the GPU (torch.compile's custom-op path included), the check that the benchmark's fused
# providers compute what the torch provider does and that the launches they record are what ran, fail fast (--maxfail=3: the first process with three failures
# stops every process, so a first run on hardware shows a pattern, not one failure); the ahead-of-time compile
# test is left to the CPU machine's CI (and the opt-in compile-check phase). parity_margins.jsonl gets each
# comparison's error / bound (benchmarks/parity_margins.py): how close the GPU's rounding comes to the tests' bounds
MARGINS="$OUT_DIR/parity_margins.jsonl"
rm -f "$MARGINS"
PARITY_MARGINS="$MARGINS" TORCHINDUCTOR_COMPILE_THREADS=1 phase parity 170 "${PARALLEL[@]}" \
    -p benchmarks.parity_margins tests/test_kernels_parity.py tests/test_kernels_autograd.py \
    tests/test_kernels_memory.py tests/test_kernels_strategies.py tests/test_kernels_split_rank.py \
    tests/test_kernels_launches.py tests/test_torch_compile.py tests/test_kernels_dropout.py tests/test_cuda_graphs.py \
    "tests/test_bench_tools.py::test_the_fused_providers_compute_what_the_torch_provider_computes" \
    "tests/test_bench_tools.py::test_kernel_launches_record_the_strategy_split_and_sum_that_ran" \
    --maxfail=3 -q -p no:cacheprovider

# every benchmark case once, untimed, in parallel: fills the triton and inductor caches for the timed runs.
# One inductor compile thread per process: with 16 processes its default pool (one worker per core) would
# put ~256 compile workers on 16 cores. A case after which a process's CUDA context was broken (its process then
# stops, benchmarks/conftest.py) is left out of the timed runs: it would break them again
BROKEN="$WORK/broken.txt"
: >"$BROKEN"
BENCH_BROKEN_LOG="$BROKEN" TORCHINDUCTOR_COMPILE_THREADS=1 phase bench-warmup 75 "${PARALLEL[@]}" benchmarks -q \
    -p no:cacheprovider --benchmark-disable ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
DESELECT=()
while read -r id; do [ -z "$id" ] || DESELECT+=(--deselect "$id"); done <"$BROKEN"
if [ "${#DESELECT[@]}" -gt 0 ]; then
    echo "=== left out of the timed runs (the CUDA context broke after them): $(tr '\n' ' ' <"$BROKEN")"
fi
TIMED_ARGS=(${DESELECT[@]+"${DESELECT[@]}"} ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}) # every timed benchmark run's

# the timed phases leave 80 s (RESERVE_S): the report's 20, the summary's 40, a killed phase's 10 of grace and 10
# more, so that a short deadline still writes bench.md
BENCH_TIME_BUDGET_S=105 RESERVE_S=80 phase bench-linear 135 "$PY" -m pytest benchmarks/test_bench_linear.py -q \
    -p no:cacheprovider --benchmark-json="$OUT_DIR/bench_linear.json" --benchmark-columns=min,median,rounds \
    ${TIMED_ARGS[@]+"${TIMED_ARGS[@]}"}
gpu_state "after bench-linear"

# eager decode (no CUDA graph): the host launch path per projection, ours against nn.Linear and PEFT; before the
# end-to-end step, which takes longer, so that a short deadline cuts that one
BENCH_TIME_BUDGET_S=15 RESERVE_S=80 phase bench-eager 25 "$PY" -m pytest benchmarks/test_bench_eager.py -q \
    -p no:cacheprovider --benchmark-json="$OUT_DIR/bench_eager.json" --benchmark-columns=min,median,rounds \
    ${TIMED_ARGS[@]+"${TIMED_ARGS[@]}"}

BENCH_TIME_BUDGET_S=35 RESERVE_S=80 phase bench-e2e 45 "$PY" -m pytest benchmarks/test_bench_e2e.py -q \
    -p no:cacheprovider --benchmark-json="$OUT_DIR/bench_e2e.json" --benchmark-columns=min,median,rounds \
    ${TIMED_ARGS[@]+"${TIMED_ARGS[@]}"}

# opt-in (GPU_CHECK_COMPILE=1, or GPU_CHECK_ONLY="compile-check"): the CPU machine compiles the same rows with
# the same triton and ptxas; here it would cost 40 s of the deadline
if [ "${GPU_CHECK_COMPILE:-0}" != 1 ] && [[ " ${GPU_CHECK_ONLY:-} " != *" compile-check "* ]]; then
    STATUS+=("$(printf '%-14s %-16s %4ss' compile-check "not selected" 0)")
elif "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('tied_lora_kernels.kernels.compile_check') is None)" 2>/dev/null; then
    # this GPU's architecture family only (sm_90 on an H100/H200); CI compiles every target
    MAJOR="$("$PY" -c 'import torch; print(torch.cuda.get_device_capability()[0])' 2>/dev/null || echo 9)"
    # compile_check.partial.jsonl gets each row as its compile finishes: what is left if the limit stops it
    phase compile-check 40 "$PY" -m tied_lora_kernels.kernels.compile_check --jobs "$(nproc)" \
        --targets $((MAJOR * 10)) --partial "$OUT_DIR/compile_check.partial.jsonl"
else
    echo
    echo "=== compile-check: tied_lora_kernels.kernels.compile_check not present, skipped"
    STATUS+=("$(printf '%-14s %-16s %4ss' compile-check absent 0)")
fi

# opt-in (GPU_CHECK_SANITIZE=1, or GPU_CHECK_ONLY="sanitize": a second, short call when device time is left): bf16
# kernel tests at small, ragged shapes under compute-sanitizer's memcheck, which reports reads and writes outside
# an allocation (a load that lost its mask reads past a tensor without changing any result the tests compare).
# PyTorch's caching allocator is off so that each tensor is an allocation of its own
if [ "${GPU_CHECK_SANITIZE:-0}" = 1 ] || [[ " ${GPU_CHECK_ONLY:-} " == *" sanitize "* ]]; then
    SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
    if [ -n "$SANITIZER" ]; then
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 phase sanitize 150 "$SANITIZER" --tool memcheck --error-exitcode 1 \
            --print-limit 20 "$PY" -m pytest tests/test_kernels_parity.py tests/test_kernels_strategies.py \
            tests/test_kernels_split_rank.py -x -q -p no:cacheprovider \
            -k "(test_configurations or test_shapes or test_fused_mm_decode) and bfloat16"
    else
        echo
        echo "=== sanitize: compute-sanitizer not found (PATH, /usr/local/cuda/bin), skipped"
        STATUS+=("$(printf '%-14s %-16s %4ss' sanitize absent 0)")
    fi
fi

JSONS=()
for f in "$OUT_DIR/bench_linear.json" "$OUT_DIR/bench_e2e.json" "$OUT_DIR/bench_eager.json"; do
    [ -s "$f" ] && JSONS+=("$f")
done
if [ "${#JSONS[@]}" -gt 0 ]; then
    # bench.md opens with the commit and the phases' outcomes: read parity's line before any timing
    {
        echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit ${GPU_CHECK_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
        [ -s "$WORK/env.txt" ] && cat "$WORK/env.txt"
        printf '%s\n' "${STATUS[@]}"
    } >"$WORK/note.txt"
    phase report 20 "$PY" -m tied_lora_kernels.bench --json "${JSONS[@]}" --no-plot --markdown "$OUT_DIR/bench.md" \
        --note "$WORK/note.txt"
fi

echo
echo "=== gpu_check summary ($(date -u +%H:%M:%SZ))"
[ -s "$WORK/env.txt" ] && cat "$WORK/env.txt"
printf '%s\n' "${STATUS[@]}"
[ -s "$MARGINS" ] && { timeout 20 "$PY" -m benchmarks.parity_margins "$MARGINS" --worst 5 || true; }
if [ "${#JSONS[@]}" -gt 0 ]; then
    timeout 20 "$PY" -m tied_lora_kernels.bench --json "${JSONS[@]}" --headline --no-plot || true
elif [ -n "${GPU_CHECK_ONLY:-}" ]; then
    echo "no benchmark JSON (GPU_CHECK_ONLY=\"$GPU_CHECK_ONLY\")"
else
    echo "no benchmark JSON was written"
    FAILED=1
fi

# after the summary, where a time limit cuts nothing else: does ptxas 12.9 corrupt the kernels on this GPU?
# (kernels.hopper_ptxas keeps them from it; the small-integer exactness tests assembled by the 12.9 that triton
# bundles, benchmarks/ptxas_probe.py). A measurement: its outcome, even a time-out, does not fail the check
KEEP_FAILED="$FAILED"
RESERVE_S=10 phase ptxas-probe 45 "$PY" -m benchmarks.ptxas_probe "$OUT_DIR/ptxas_probe.json"
FAILED="$KEEP_FAILED"
FILES=$(find "$OUT_DIR" -type f | wc -l)
[ "$FILES" -le 8 ] || echo "WARNING: $FILES files under $OUT_DIR; the device tool brings back at most 8"
# the phases once more, last: the device tool's reply keeps only the end of what is printed
echo
echo "=== phases"
printf '%s\n' "${STATUS[@]}"
echo "=== gpu_check done in $(($(date +%s) - T0))s"
rm -rf "$WORK"
finish "$FAILED"
