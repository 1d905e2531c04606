#!/usr/bin/env bash
# One device call: build the extension, run every test (GPU ones included,
# with vLLM's compiled ops as the oracle), compute-sanitizer, the benchmark.
# Logs go to $OUT (or ./gpu-out). Carry .oracle (see ../shared/tools/vllm-oracle).
#   bash benchmarks/gpu_suite.sh [pytest args...]
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
oracle=.oracle/vllm-0.26.0-_C.so
[[ -f $oracle.xz && ! -f $oracle ]] && xz -dkf "$oracle.xz"
[[ -f $oracle ]] && export W4A8_FASTPREP_ORACLE=$PWD/$oracle
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv; date -u; \
  python3 -c 'import torch; print("torch", torch.__version__)'; } 2>&1 | tee "$OUT/env.log"
t0=$(date +%s)
W4A8_FASTPREP_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-8} python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
grep -E "registers|spill" "$OUT/build.log" | sort -u | head -20
echo "build: $(( $(date +%s) - t0 )) s"
if [[ ${SKIP_VARIANTS:-0} != 1 ]]; then
  nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc \
    benchmarks/encode_reorder_variants.cu -o /tmp/variants && /tmp/variants 2>&1 | tee "$OUT/variants.log"
fi
python3 -X faulthandler -m pytest -v -rs --tb=short -p no:cacheprovider tests "$@" > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"
grep -E "^E  |FAILED|ERROR|Fatal|passed|failed" "$OUT/pytest.log" | cut -c1-300 | tail -60
if [[ ${SKIP_BENCH:-0} != 1 ]]; then
  python3 benchmarks/bench_prep.py ${W4A8_FASTPREP_ORACLE:+--upstream "$W4A8_FASTPREP_ORACLE"} \
    --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
fi
