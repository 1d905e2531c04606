#!/usr/bin/env bash
# End-to-end on the lent GPU with upstream vLLM 0.26.0 (../shared/tools/vllm-gpu-bundle):
# two device calls back to back (the machine keeps the unpacked bundle, $VB, only while warm):
#   1) carry .vllm-bundle/part1:  bash .vllm-bundle/part1/unpack.sh
#   2) carry .vllm-bundle/part2:  bash evals/gpu_e2e.sh STEP...
# Steps: setup (unpack part 2, build, install the plugin), tests (all tests, upstream's ops
# as the oracle), bench, tiny, 8b, 70b (synthetic checkpoints, startup time ours vs upstream, output identity).
# Summaries and charts go to $OUT (8 files at most come back).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
WORK=${WORK:-${TMPDIR:-/tmp}/e2e}; mkdir -p "$WORK"
export VB=${VB:-$HOME/vb}  # where the bundle's unpack scripts put vLLM (their default)
export PYTHONUNBUFFERED=1
[[ -f $VB/activate.sh ]] && source $VB/activate.sh

startup() {  # name, model dir, extra args
  local name=$1 model=$2; shift 2
  python3 -m evals.startup_time --model "$model" --out-dir "$WORK/$name" "$@" 2>&1 \
    | grep -v "it/s\]$" | tail -14
  cp "$WORK/$name/summary.json" "$OUT/$name.json" 2>/dev/null
  cp "$WORK/$name/startup_time.png" "$OUT/$name.png" 2>/dev/null
}

for step in "$@"; do
  echo "=== $step ($(date -u +%T))"
  case $step in
    setup)
      [[ -f $VB/vllm/__init__.py ]] || bash .vllm-bundle/part2/unpack.sh || exit 1
      source $VB/activate.sh
      MAX_JOBS=8 python3 setup.py build_ext --inplace > "$WORK/build.log" 2>&1 \
        || { tail -30 "$WORK/build.log"; exit 1; }
      python3 -m pip install -q --no-build-isolation --no-deps -e . > "$WORK/pip.log" 2>&1 \
        || { tail -20 "$WORK/pip.log"; exit 1; } ;;
    tests)  # every test: kernels vs upstream's ops (the bundle's _C), plugin in real vLLM
      W4A8_FASTPREP_ORACLE=$VB/vllm/_C_stable_libtorch.abi3.so python3 -m pytest -q -rs \
        -p no:cacheprovider tests > "$OUT/pytest-all.log" 2>&1
      grep -E "^(FAILED|ERROR|XFAIL)|passed|failed" "$OUT/pytest-all.log" | tail -12 ;;
    bench)
      python3 benchmarks/bench_prep.py --upstream $VB/vllm/_C_stable_libtorch.abi3.so \
        --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -22 ;;
    tiny)
      python3 -m vllm_w4a8_fastprep synth "$WORK/tiny" > /dev/null
      startup tiny-eager "$WORK/tiny" --runs 1 --enforce-eager
      startup tiny-compiled "$WORK/tiny" --runs 1 ;;
    8b)
      python3 -m vllm_w4a8_fastprep synth "$WORK/8b" --preset 8b --device cuda > /dev/null
      startup 8b "$WORK/8b" --runs ${RUNS:-2} ${STARTUP_ARGS:-} ;;
    70b)
      python3 -m vllm_w4a8_fastprep synth "$WORK/70b" --preset 70b --layers ${LAYERS_70B:-80} \
        --device cuda > /dev/null
      df -h "$WORK" | tail -1
      startup 70b "$WORK/70b" --runs ${RUNS:-1} ${STARTUP_ARGS:-} ;;
  esac
done
