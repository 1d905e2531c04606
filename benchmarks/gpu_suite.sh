#!/usr/bin/env bash
# On a machine with a Hopper GPU, in one invocation: build the extension, run
# every test (GPU ones included, with vLLM's compiled ops as the oracle), the
# kernel geometry sweep, the benchmark (dense layers, then MoE layers). Logs go
# to $OUT (or ./gpu-out). The oracle is found by vllm_w4a8_fastprep/tools/vllm_ops.py
# ($W4A8_FASTPREP_ORACLE, a vLLM _C library in .oracle/, or the installed vllm).
#   bash benchmarks/gpu_suite.sh [pytest args...]
# e.g. -m "gpu or vllm_layers": the GPU tests and the tests that build vLLM's layers (which
# build them on the GPU here); no arguments: every test.
# SKIP_VARIANTS=1, SKIP_BENCH=1, SKIP_MOE_BENCH=1 leave those parts out; SKIP_BUILD=1 uses the
# extension already in vllm_w4a8_fastprep/ (e.g. the one built for the wheel being tested).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
found=$(python3 -m vllm_w4a8_fastprep.tools.vllm_ops) || { echo "oracle: $found"; exit 1; }
if [[ -f $found ]]; then export W4A8_FASTPREP_ORACLE=$found; echo "oracle: $found"
else echo "oracle: $found (GPU comparisons with upstream will skip)"; fi
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv; date -u; \
  python3 -c 'import torch; print("torch", torch.__version__)'; \
  python3 -c 'from vllm_w4a8_fastprep.tools.provenance import source_commit; print("commit", source_commit())'; } \
  2>&1 | tee "$OUT/env.log"
t0=$(date +%s)
if [[ ${SKIP_BUILD:-0} == 1 ]]; then
  ls vllm_w4a8_fastprep/_C*.so > /dev/null 2>&1 || { echo "SKIP_BUILD=1 but no built extension"; exit 1; }
  sha256sum vllm_w4a8_fastprep/_C*.so | tee -a "$OUT/env.log"
else
  W4A8_FASTPREP_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-8} python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
  grep -E "registers|spill" "$OUT/build.log" | sort -u | head -20
  echo "build: $(( $(date +%s) - t0 )) s"
fi
if [[ ${SKIP_VARIANTS:-0} != 1 ]]; then
  shapes=$(python3 -c "from vllm_w4a8_fastprep.tools.model_shapes import DENSE_LARGE as L, DENSE as D; print(*(f'{n} {k}' for n, k in [*L.values(), D['llama2-7b/down@tp2']]))")
  nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc \
    benchmarks/encode_reorder_variants.cu -o /tmp/variants && /tmp/variants $shapes 2>&1 | tee "$OUT/variants.log"
fi
python3 -X faulthandler -m pytest -v -rs --tb=short -p no:cacheprovider tests "$@" > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"
grep -E "^E  |FAILED|ERROR|Fatal|passed|failed" "$OUT/pytest.log" | cut -c1-300 | tail -60
up=${W4A8_FASTPREP_ORACLE:+--upstream "$W4A8_FASTPREP_ORACLE"}
if [[ ${SKIP_BENCH:-0} != 1 ]]; then
  python3 benchmarks/bench_prep.py $up --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
  echo "bench rc=${PIPESTATUS[0]}"
fi
if [[ ${SKIP_BENCH:-0} != 1 && ${SKIP_MOE_BENCH:-0} != 1 ]]; then
  python3 benchmarks/bench_prep.py --moe $up --json "$OUT/bench-moe.json" 2>&1 | tee "$OUT/bench-moe.log"
  echo "bench --moe rc=${PIPESTATUS[0]}"
fi
