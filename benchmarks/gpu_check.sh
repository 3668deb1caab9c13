#!/usr/bin/env bash
# The prepared check for a GPU machine, sized for ONE call of at most 9 minutes on an H200:
# build llmcore._native with its CUDA kernels, run the GPU tests, then the benchmarks in order of
# importance, each stage with its own time budget and writing its results as it goes.
#
#   benchmarks/gpu_check.sh [OUT_DIR]        OUT_DIR defaults to benchmarks/results/gpu-<UTC
#                                            date and time>; on the device machine ($OUT set,
#                                            no OUT_DIR) it is /tmp/gpu_check, packed after every
#                                            stage into $OUT/gpu_check.tar.gz (the device brings
#                                            back at most 8 files), with gpu_check.log beside it
#
# Stages (GPU_CHECK_STAGES, default "build tests ops profile steps features"):
#   build    pip install --no-build-isolation --no-deps -e . (CUDA arch 90 unless
#            LLMCORE_CUDA_ARCHS says otherwise)                               ~1 min
#   tests    pytest -m gpu                                       at most GPU_CHECK_TEST_S (150 s)
#   ops      llmcore bench: overhead (30 s), then fwd+bwd of linear_cross_entropy,
#            cross_entropy, rms_norm, layer_norm, rope, swiglu, gelu against eager and liger
#            when installed
#                                                                GPU_CHECK_OPS_MINUTES (1.75)
#   profile  torch.profiler tables of the train step: gpt2-small (llmcore_auto and hf), the
#            llama case (llmcore_auto)                                        ~1.5 min
#   steps    llmcore bench, three runs: train_step (gpt2, llama, bert, bert_padded; torch,
#            llmcore_auto, hf, llmcore_triton)               GPU_CHECK_STEPS_MINUTES (1);
#            the compiled providers on gpt2-small (llmcore_compile, hf_compile, torch_compile:
#            about a minute of compiling each, so the last case started may run past the
#            budget by that much)                            GPU_CHECK_COMPILE_MINUTES (0.75);
#            attention (torch, sdpa, llmcore_triton and its _nondet and _ordered
#            backward schedules)                            GPU_CHECK_ATTENTION_MINUTES (0.35)
#   features llmcore bench: attention_features (window, softcap, ALiBi, documents, bool mask vs
#            FlexAttention and SDPA), attention_varlen           GPU_CHECK_FEATURES_MINUTES (1)
#   sweep    (opt-in, not in the default list: a second call, GPU_CHECK_STAGES=sweep)
#            benchmarks/triton_sweep.py: every candidate launch configuration of the Triton
#            norm and cross-entropy kernels and linear_cross_entropy's chunk sizes, timed
#            against the default's outputs                   GPU_CHECK_SWEEP_MINUTES (3)
# Liger-Kernel is pure Python: put its wheel in .whl/ (see benchmarks/README.md) and carry .whl;
# this script installs it to /tmp/site when it is there.
#
# Environment: PYTHON (default python3); GPU_CHECK_DRY_RUN=1 on a machine without CUDA runs
# what the CPU can (the build, pytest -m gpu, which then skips everything, the suites with the
# tiny sizes on the CPU, a CPU profile) to check the script itself.
# Writes: gpu_check.log (the summary), build.log, pytest_gpu.log, info.txt,
# attention_tuning.jsonl (each attention autotune choice and its candidates' times), overhead/, ops/,
# steps/, compile/, attention/, features/, sweep/ (sweep.jsonl, sweep.md, sweep.log)
# (results.json, results.md, bench.log each), profile_*.txt. Exit status: 0 when every stage
# passed, 1 when one failed, 2 when there is no CUDA device (and no dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
archive=${GPU_CHECK_ARCHIVE:-}
if [ $# -ge 1 ]; then
    out=$1
elif [ -n "${OUT:-}" ]; then
    out=/tmp/gpu_check
    archive=${archive:-$OUT/gpu_check.tar.gz}
else
    out=benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)
fi
stages=${GPU_CHECK_STAGES:-build tests ops profile steps features}
mkdir -p "$out"
summary="$out/gpu_check.log"
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$summary"; }
pack() {  # everything so far into the archive (if any), replaced whole, and the summary beside it
    [ -n "$archive" ] || return 0
    tar czf "$archive.part" -C "$out" . && mv "$archive.part" "$archive"
    cp "$summary" "$(dirname "$archive")/gpu_check.log"
}
failed=0
export PYTHONUNBUFFERED=1
# every attention autotune choice, with each candidate's time: the data to prune the tables with
export LLMCORE_TUNING_LOG="$out/attention_tuning.jsonl"

say "output: $out; stages: $stages; commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    say "liger: installed from $(ls .whl/liger_kernel-*.whl)"
fi
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
    say "dry run: the GPU parts are skipped; the suites run on the CPU with the tiny sizes"
fi

bench() {  # bench NAME MINUTES OPS PROVIDERS [MORE ARGS]: one llmcore bench run into $out/NAME
    local name=$1 minutes=$2 ops=$3 providers=$4 args
    shift 4
    mkdir -p "$out/$name"
    if [ "$cuda" = 1 ]; then
        args=(--device cuda --quick --max-minutes "$minutes" --ops "$ops" --no-plots
              --providers "$providers" "$@")
    else
        args=(--device cpu --size-set tiny --threads 1 --ops "$ops" --no-plots --no-memory
              --providers torch,llmcore_native "$@")
    fi
    say "$name: llmcore bench ${args[*]}"
    local t0=$SECONDS
    "$py" -m llmcore bench "${args[@]}" --out "$out/$name" >"$out/$name/bench.log" 2>&1
    local status=$?
    say "$name: exit $status in $((SECONDS - t0)) s: $(tail -1 "$out/$name/bench.log")"
    [ "$status" = 0 ] || failed=1
}

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
        "$py" -m llmcore info >"$out/info.txt" 2>&1
        ;;
    tests)
        say "tests: pytest -m gpu (at most ${GPU_CHECK_TEST_S:-150} s)"
        t0=$SECONDS
        timeout "${GPU_CHECK_TEST_S:-150}" "$py" -m pytest -q -m gpu -p no:cacheprovider tests \
            >"$out/pytest_gpu.log" 2>&1
        status=$?
        # 5 = no test collected, which is a failure here too: the GPU tests must exist
        say "tests: exit $status in $((SECONDS - t0)) s: $(tail -1 "$out/pytest_gpu.log")"
        [ "$status" = 0 ] || failed=1
        ;;
    ops)
        # the peers that can run here (a provider named but missing would stop the run)
        peers=torch,llmcore_triton,llmcore_native
        "$py" -c "import liger_kernel" 2>/dev/null && peers=$peers,liger
        bench overhead 0.5 overhead torch,llmcore_triton,llmcore_native
        bench ops "${GPU_CHECK_OPS_MINUTES:-1.75}" \
            linear_cross_entropy,cross_entropy,rms_norm,layer_norm,rope,swiglu,gelu "$peers" \
            --modes fwd+bwd
        ;;
    profile)
        size=quick; [ "$cuda" = 1 ] || size=tiny
        for case in gpt2:llmcore_auto gpt2:hf llama:llmcore_auto; do
            flavour=${case%%:*} provider=${case#*:}
            t0=$SECONDS
            timeout 120 "$py" benchmarks/profile_train_step.py --size-set "$size" \
                --flavour "$flavour" --provider "$provider" --out "$out" \
                >>"$out/profile.log" 2>&1
            status=$?
            say "profile $flavour $provider: exit $status in $((SECONDS - t0)) s: $(grep -h 'time per step' "$out"/profile_"$flavour"_"$provider".txt 2>/dev/null | tr '\n' ';')"
            [ "$status" = 0 ] || failed=1
        done
        ;;
    steps)
        # every case eagerly first (a case is a few seconds), then the compiled providers on
        # the case the targets are set for (a compile is ~1 min), then attention
        bench steps "${GPU_CHECK_STEPS_MINUTES:-1}" train_step \
            torch,llmcore_auto,hf,llmcore_triton
        bench compile "${GPU_CHECK_COMPILE_MINUTES:-0.75}" train_step \
            llmcore_compile,hf_compile,torch_compile --variants gpt2
        bench attention "${GPU_CHECK_ATTENTION_MINUTES:-0.35}" attention \
            torch,sdpa,llmcore_triton,llmcore_triton_nondet,llmcore_triton_ordered
        ;;
    features)
        bench features "${GPU_CHECK_FEATURES_MINUTES:-1}" attention_features,attention_varlen \
            sdpa,flex_attention,llmcore_triton
        ;;
    sweep)
        # opt-in (not in the default stages): the norm / cross-entropy launch configurations,
        # for a second call right after the first (Triton only: needs no build)
        mkdir -p "$out/sweep"
        t0=$SECONDS
        if [ "$cuda" = 1 ]; then
            "$py" benchmarks/triton_sweep.py --out "$out/sweep" \
                --max-minutes "${GPU_CHECK_SWEEP_MINUTES:-3}" >"$out/sweep/sweep.log" 2>&1
        else
            TRITON_INTERPRET=1 "$py" benchmarks/triton_sweep.py --out "$out/sweep" --size tiny \
                --ops norm_fwd,ce --max-minutes 0.5 >"$out/sweep/sweep.log" 2>&1
        fi
        status=$?
        say "sweep: exit $status in $((SECONDS - t0)) s: $(grep -c . "$out/sweep/sweep.jsonl" 2>/dev/null || echo 0) candidates timed"
        [ "$status" = 0 ] || failed=1
        ;;
    *)
        say "unknown stage '$stage' (stages: build tests ops profile steps features sweep)"
        failed=1
        ;;
    esac
    pack
done
say "done: $([ "$failed" = 0 ] && echo 'every stage passed' || echo 'a stage FAILED')"
pack
exit "$failed"
