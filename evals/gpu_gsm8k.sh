#!/usr/bin/env bash
# gsm8k through lm-eval's vLLM backend, and startup time, ours vs upstream, on a real W4AFP8
# checkpoint on the lent GPU (upstream vLLM 0.26.0 from ../shared/tools/vllm-gpu-bundle).
# Every step below is one device call, sent back to back: the machine keeps what lies outside
# the repository (checkpoint, bundle, lm-eval, data, results) only while it stays warm.
#
#   pieces   carry [".chunks/NAME/partK"]:  bash .chunks/NAME/partK/receive.sh   (each K; the
#            checkpoint split by ../shared/tools/device-chunks, unpacked to $CHUNKS_HOME/NAME/out)
#   bundle   carry [".vllm-bundle/part1"]:  bash .vllm-bundle/part1/unpack.sh
#   plugin   carry [".vllm-bundle/part2"]:  bash evals/gpu_e2e.sh setup   (vLLM, build, install)
#   setup    carry [".whl", ".gsm8k-data"]:  bash evals/gpu_gsm8k.sh setup
#            installs the wheels of .whl (lm-eval and what it needs beyond the machine and the
#            bundle) into $SITE, copies the gsm8k data to $DATA, checks the checkpoint (config,
#            sha256). Part 2 of the bundle and these two do not fit one call's 64 MiB together.
#   gsm8k    bash evals/gpu_gsm8k.sh gsm8k MODE...    (MODE: upstream or ours, in order)
#            one lm-eval run per MODE, each a fresh process, into $RES/$TAG (runs of earlier
#            calls with the same TAG are kept and compared: upstream, ours, upstream-2, ...);
#            report.md, summary.json and this call's logs and samples go to $OUT
#   report   bash evals/gpu_gsm8k.sh report           (the report of $RES/$TAG again)
#   startup  bash evals/gpu_gsm8k.sh startup          (evals.startup_time, $RUNS runs per mode)
#
# Environment: MODEL (default $CHUNKS_HOME/qwen15/out), CHUNKS_HOME (default /root/chunks),
# MODEL_SHA256 (expected sha256 of MODEL/model.safetensors; empty: not checked), TAG (results
# folder, default "default": one TAG per setting), GSM8K_ARGS (more evals.gsm8k flags, e.g.
# "--batch-invariant" or "--in-process-engine" or "--limit 200"), RUNS (startup, default 3),
# BUDGET_S (seconds this call may spend on its runs, default 540: a run that would outlast it
# is stopped and reported as failed, so the call still returns its files).
set -uo pipefail
T0=$SECONDS
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
export VB=${VB:-$HOME/vb}
CHUNKS_HOME=${CHUNKS_HOME:-/root/chunks}
MODEL=${MODEL:-$CHUNKS_HOME/qwen15/out}
MODEL_SHA256=${MODEL_SHA256-5b6948fe49a10f79da4ee1e83bb15570372d4c761ae8dbbfb38adedddc90c665}
SITE=${SITE:-$HOME/lmeval-site}
DATA=${DATA:-$HOME/gsm8k-data}
RES=${RES:-$HOME/gsm8k-res}
TAG=${TAG:-default}
BUDGET_S=${BUDGET_S:-540}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1
[[ -f $VB/activate.sh ]] && source "$VB/activate.sh"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}

left() { echo $(( BUDGET_S - (SECONDS - T0) )); }
quiet() { grep -vE "it/s\]|s/it\]|^\s*$" "$@"; }

[[ ${1:-} ]] || { sed -n '2,30p' "$0"; exit 2; }
step=$1; shift
echo "=== $step $* ($(date -u +%T), TAG=$TAG, GSM8K_ARGS=${GSM8K_ARGS:-})"
case $step in
  setup)
    [[ -f $VB/activate.sh ]] || { echo "no vLLM bundle in $VB: run the bundle and plugin steps" >&2; exit 1; }
    ls .whl/*.whl > /dev/null || { echo "no .whl/*.whl: carry .whl" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl || exit 1
    [[ -f .gsm8k-data/test.jsonl ]] || { echo "no .gsm8k-data/test.jsonl: carry .gsm8k-data" >&2; exit 1; }
    mkdir -p "$DATA" && cp .gsm8k-data/test.jsonl .gsm8k-data/train.jsonl "$DATA"/ || exit 1
    (cd /tmp && python3 -c "
import lm_eval, datasets, lm_eval.models.vllm_causallms, vllm, torch, vllm_w4a8_fastprep.ops
print('lm-eval', lm_eval.__version__, '| datasets', datasets.__version__, '| vllm', vllm.__version__,
      '| torch', torch.__version__, '|', torch.cuda.get_device_name(), '| plugin ops loaded')") || exit 1
    python3 -m evals.make_checkpoint check "$MODEL" || exit 1
    if [[ -n $MODEL_SHA256 ]]; then
      echo "$MODEL_SHA256  $MODEL/model.safetensors" | sha256sum -c - || exit 1
    fi ;;
  gsm8k)
    [[ $# -gt 0 ]] || { echo "gsm8k: give the modes, e.g. gsm8k upstream ours" >&2; exit 2; }
    mkdir -p "$RES/$TAG"
    before=$(ls "$RES/$TAG"/*.log 2>/dev/null)
    rc=0
    for mode in "$@"; do
      budget=$(( $(left) - 15 ))
      (( budget > 60 )) || { echo "gsm8k: no time left for $mode in this call" >&2; rc=1; break; }
      # shellcheck disable=SC2086  # GSM8K_ARGS holds several flags
      python3 -m evals.gsm8k --model "$MODEL" --data-dir "$DATA" --modes "$mode" \
        --attention-backend TRITON_ATTN --out-dir "$RES/$TAG" --timeout "$budget" \
        ${GSM8K_ARGS:-} 2>&1 | grep -E "^gsm8k:|failed|Error|error" | tail -30
      (( PIPESTATUS[0] == 0 )) || { rc=1; break; }
    done
    python3 -m evals.gsm8k --report --out-dir "$RES/$TAG" > "$OUT/report.md.txt" 2>&1
    cat "$OUT/report.md.txt"; rm -f "$OUT/report.md.txt"
    cp "$RES/$TAG/report.md" "$RES/$TAG/summary.json" "$OUT"/ 2>/dev/null
    for log in "$RES/$TAG"/*.log; do
      grep -qxF "$log" <<< "$before" && continue
      label=$(basename "$log" .log)
      quiet "$log" | tail -400 > "$OUT/$TAG-$label.log"
      [[ -f $RES/$TAG/$label.samples.jsonl ]] && cp "$RES/$TAG/$label.samples.jsonl" "$OUT/$TAG-$label.samples.jsonl"
    done
    exit $rc ;;
  report)
    python3 -m evals.gsm8k --report --out-dir "$RES/$TAG" && cp "$RES/$TAG/report.md" "$RES/$TAG/summary.json" "$OUT"/ ;;
  startup)
    WORK=${WORK:-${TMPDIR:-/tmp}/e2e}/startup-real
    python3 -m evals.startup_time --model "$MODEL" --runs "${RUNS:-3}" --out-dir "$WORK" \
      --timeout 150 2>&1 | grep -v "it/s\]$" | tail -14
    rc=${PIPESTATUS[0]}
    cp "$WORK/summary.json" "$OUT/startup.json" 2>/dev/null
    cp "$WORK/startup_time.png" "$OUT/startup.png" 2>/dev/null
    for log in "$WORK"/ours-0.log "$WORK"/upstream-0.log; do
      [[ -f $log ]] && quiet "$log" | tail -200 > "$OUT/startup-$(basename "$log")"
    done
    exit $rc ;;
  *) echo "unknown step $step (setup, gsm8k MODE..., report, startup)" >&2; exit 2 ;;
esac
