#!/usr/bin/env bash
# The prepared check for a GPU machine (sized for one H200): build llmcore._native with its CUDA
# kernels, run the GPU tests, then the benchmark suite on CUDA (bf16, the "quick" size set,
# stopped after GPU_CHECK_BENCH_MINUTES, default 8), writing everything to one directory.
#
#   benchmarks/gpu_check.sh [OUT_DIR]        OUT_DIR defaults to $OUT, else
#                                            benchmarks/results/gpu-<UTC date and time>
#
# Environment:
#   PYTHON                   interpreter with CUDA PyTorch (default: python3)
#   GPU_CHECK_STAGES         which stages to run, in order (default "build tests bench"); split
#                            them over two calls where one call may last only ~10 minutes
#   GPU_CHECK_BENCH_MINUTES  time budget of the benchmark stage (default 8)
#   GPU_CHECK_DRY_RUN=1      on a machine without CUDA: run every stage that can run (build,
#                            pytest -m gpu, which then skips everything, and the suite on the
#                            CPU with the tiny sizes, eager providers) to check the script
#   LLMCORE_CUDA_ARCHS       passed to the build (default here: 90, Hopper only, to build fast)
#
# Writes: build.log, pytest_gpu.log, info.txt, results.json, results.md, <op>.png, bench.log,
# gpu_check.log (the summary). Exit status: 0 when every stage passed, 1 when one failed,
# 2 when there is no CUDA device (and no dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}}
stages=${GPU_CHECK_STAGES:-build tests bench}
minutes=${GPU_CHECK_BENCH_MINUTES:-8}
mkdir -p "$out"
summary="$out/gpu_check.log"
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$summary"; }
failed=0
export PYTHONUNBUFFERED=1

say "output: $out; stages: $stages; commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
if "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    cuda=1
    say "CUDA: $("$py" -c 'import torch; p = torch.cuda.get_device_properties(0); print(p.name, "torch", torch.__version__, "CUDA", torch.version.cuda)')"
else
    cuda=0
    say "no CUDA device visible to $py ($("$py" -c 'import torch; print("torch", torch.__version__, "CUDA build:", torch.version.cuda)' 2>&1 | tail -1))"
    if [ "${GPU_CHECK_DRY_RUN:-0}" != 1 ]; then
        say "nothing to check without a GPU (GPU_CHECK_DRY_RUN=1 runs the CPU-capable stages)"
        exit 2
    fi
    say "dry run: the GPU parts are skipped; the suite runs on the CPU with the tiny sizes"
fi

for stage in $stages; do
    case "$stage" in
    build)
        say "build: pip install --no-build-isolation --no-deps -e . (LLMCORE_CUDA_ARCHS=${LLMCORE_CUDA_ARCHS:-90})"
        t0=$SECONDS
        if LLMCORE_CUDA_ARCHS=${LLMCORE_CUDA_ARCHS:-90} "$py" -m pip install -q --no-build-isolation \
                --no-deps -e . >"$out/build.log" 2>&1; then
            say "build: ok in $((SECONDS - t0)) s; $("$py" -c 'from llmcore import backends; m = backends.native_module(); print("llmcore._native:", "not built" if m is None else "built, CUDA kernels: " + str(m.has_cuda()))' 2>&1 | tail -1)"
        else
            say "build: FAILED (see build.log): $(tail -3 "$out/build.log" | tr '\n' ' ')"
            failed=1
        fi
        ;;
    tests)
        say "tests: pytest -m gpu"
        t0=$SECONDS
        "$py" -m pytest -q -m gpu -p no:cacheprovider tests >"$out/pytest_gpu.log" 2>&1
        status=$?
        # 5 = no test collected, which is a failure here too: the GPU tests must exist
        say "tests: exit $status in $((SECONDS - t0)) s: $(tail -1 "$out/pytest_gpu.log")"
        [ "$status" = 0 ] || failed=1
        ;;
    bench)
        "$py" -m llmcore info >"$out/info.txt" 2>&1
        if [ "$cuda" = 1 ]; then
            # train_step and attention first: under the time budget they matter most
            args=(--device cuda --quick --max-minutes "$minutes"
                  --ops train_step,attention,attention_varlen,linear_cross_entropy,cross_entropy,rms_norm,layer_norm)
        else
            args=(--device cpu --size-set tiny --providers torch,sdpa)
        fi
        say "bench: llmcore bench ${args[*]} --out $out"
        t0=$SECONDS
        "$py" -m llmcore bench "${args[@]}" --out "$out" 2>&1 | tee "$out/bench.log"
        status=${PIPESTATUS[0]}
        say "bench: exit $status in $((SECONDS - t0)) s: $(tail -1 "$out/bench.log")"
        [ "$status" = 0 ] || failed=1
        ;;
    *)
        say "unknown stage '$stage' (stages: build tests bench)"
        failed=1
        ;;
    esac
done
say "done: $([ "$failed" = 0 ] && echo 'every stage passed' || echo 'a stage FAILED')"
exit "$failed"
