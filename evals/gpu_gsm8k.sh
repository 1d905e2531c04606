#!/usr/bin/env bash
# gsm8k through lm-eval's vLLM backend, ours vs upstream vLLM 0.26.0, on a real
# W4AFP8 checkpoint, on a machine with a Hopper GPU. Steps (one per invocation, or several
# invocations in a row; what lies outside the repository -- the checkpoint, lm-eval, the data,
# the results -- is kept between them in the folders named below):
#
#   setup    bash evals/gpu_gsm8k.sh setup
#            installs the wheels of .whl/ (lm-eval and what it needs beyond vLLM) into $SITE,
#            copies the gsm8k data of .gsm8k-data/ to $DATA, checks the checkpoint: the same
#            validator as `vllm-w4a8-fastprep prepare` (python -m evals.make_checkpoint check)
#            and the sha256 of its weight files (see MODEL_SHA256 below)
#   gsm8k    bash evals/gpu_gsm8k.sh gsm8k MODE...    (MODE: upstream or ours, in order)
#            one lm-eval run per MODE, each a fresh process, into $RES/$TAG (runs of earlier
#            invocations with the same TAG are kept and compared: upstream, ours, upstream-2,
#            ...); report.md, summary.json and this invocation's logs and samples go to $OUT
#   report   bash evals/gpu_gsm8k.sh report           (the report of $RES/$TAG again)
# (Startup time on the same checkpoint: MODEL=DIR bash evals/gpu_e2e.sh real.)
#
# vLLM: the Python environment's own, or one set up by `bash evals/gpu_e2e.sh setup` in $VB.
# Environment: MODEL (required: the W4AFP8 checkpoint folder), MODEL_SHA256 (a sha256sum file
# listing the checkpoint's weight files; default MODEL/SHA256SUMS when that exists; "none": do
# not check), TAG (results folder, default "default": one TAG per setting), GSM8K_ARGS (more
# evals.gsm8k flags, e.g. "--in-process-engine" (deterministic: ours vs upstream compared exactly)
# or "--limit 200"), BUDGET_S (seconds this invocation may spend on its gsm8k runs, default
# 540: a run that would outlast it is stopped and reported as failed, so the results still get
# written).
set -uo pipefail
T0=$SECONDS
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
export VB=${VB:-$HOME/vb}
MODEL=${MODEL:-}
MODEL_SHA256=${MODEL_SHA256:-}
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

[[ ${1:-} ]] || { sed -n '2,26p' "$0"; exit 2; }
step=$1; shift
case $step in setup|gsm8k)
  [[ -n $MODEL ]] || { echo "MODEL is not set: MODEL=/path/to/checkpoint bash $0 $step" >&2; exit 2; }
  [[ -f $MODEL/config.json ]] || { echo "MODEL=$MODEL: not a model folder (no config.json)" >&2; exit 2; } ;;
esac
echo "=== $step $* ($(date -u +%T), TAG=$TAG, GSM8K_ARGS=${GSM8K_ARGS:-})"
case $step in
  setup)
    python3 -c "import vllm" 2> /dev/null || { echo "vLLM is not importable: install it, or run bash evals/gpu_e2e.sh setup first" >&2; exit 1; }
    if compgen -G ".whl/*.whl" > /dev/null; then  # offline: lm-eval from wheels
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl || exit 1
    elif ! python3 -c "import lm_eval" 2> /dev/null; then
      echo "lm-eval is not importable and there is no .whl/*.whl to install it from:" \
        "pip install 'lm-eval[hf]==0.4.13', or put its wheels in .whl/" >&2
      exit 1
    fi
    [[ -f .gsm8k-data/test.jsonl ]] || { echo "no .gsm8k-data/test.jsonl: put gsm8k's test.jsonl and train.jsonl there" >&2; exit 1; }
    mkdir -p "$DATA" && cp .gsm8k-data/test.jsonl .gsm8k-data/train.jsonl "$DATA"/ || exit 1
    (cd /tmp && python3 -c "
import lm_eval, datasets, lm_eval.models.vllm_causallms, vllm, torch, vllm_w4a8_fastprep.ops
print('lm-eval', lm_eval.__version__, '| datasets', datasets.__version__, '| vllm', vllm.__version__,
      '| torch', torch.__version__, '|', torch.cuda.get_device_name(), '| plugin ops loaded')") || exit 1
    python3 -m evals.make_checkpoint check "$MODEL" || exit 1
    sums=${MODEL_SHA256:-$MODEL/SHA256SUMS}
    if [[ $sums == none ]]; then
      echo "sha256: not checked (MODEL_SHA256=none)"
    elif [[ -f $sums ]]; then  # lines "HEX  FILE", FILE relative to the checkpoint folder
      sums=$(realpath "$sums")
      (cd "$MODEL" && sha256sum --strict -c "$sums") || exit 1
    elif [[ -n $MODEL_SHA256 ]]; then
      echo "MODEL_SHA256=$MODEL_SHA256: no such file" >&2; exit 1
    else
      echo "sha256: not checked (no $MODEL/SHA256SUMS; write one with" \
        "(cd \$MODEL && sha256sum *.safetensors > SHA256SUMS), or set MODEL_SHA256=none)"
    fi ;;
  gsm8k)
    [[ $# -gt 0 ]] || { echo "gsm8k: give the modes, e.g. gsm8k upstream ours" >&2; exit 2; }
    for mode in "$@"; do
      [[ $mode == upstream || $mode == ours ]] \
        || { echo "gsm8k: unknown mode '$mode' (upstream or ours)" >&2; exit 2; }
    done
    mkdir -p "$RES/$TAG"
    rm -f "$OUT/report.md" "$OUT/summary.json"  # no earlier invocation's report in $OUT
    stamp=$(mktemp) && touch "$stamp"  # logs written after it are this invocation's (a retry
    rc=0                               # of a failed run reuses its name, so its log)
    for mode in "$@"; do
      budget=$(( $(left) - 15 ))
      (( budget > 60 )) || { echo "gsm8k: no time left for $mode (BUDGET_S)" >&2; rc=1; break; }
      # shellcheck disable=SC2086  # GSM8K_ARGS holds several flags
      python3 -m evals.gsm8k --model "$MODEL" --data-dir "$DATA" --modes "$mode" \
        --attention-backend TRITON_ATTN --out-dir "$RES/$TAG" --timeout "$budget" \
        ${GSM8K_ARGS:-} 2>&1 | grep -E "^gsm8k:|failed|Error|error" | tail -30
      (( PIPESTATUS[0] == 0 )) || { rc=1; break; }
    done
    rm -f "$RES/$TAG/report.md" "$RES/$TAG/summary.json"  # only this invocation's report
    if ! ls "$RES/$TAG"/*.json 2> /dev/null | grep -qv "/data.json$"; then
      rc=1  # no run finished: nothing to report (the failure was printed above)
    elif python3 -m evals.gsm8k --report --out-dir "$RES/$TAG"; then
      cp "$RES/$TAG/report.md" "$RES/$TAG/summary.json" "$OUT"/
    else
      rc=1
    fi
    for log in "$RES/$TAG"/*.log; do
      [[ -e $log && $log -nt $stamp ]] || continue
      label=$(basename "$log" .log)
      quiet "$log" | tail -400 > "$OUT/$TAG-$label.log"
      [[ -f $RES/$TAG/$label.samples.jsonl ]] && cp "$RES/$TAG/$label.samples.jsonl" "$OUT/$TAG-$label.samples.jsonl"
    done
    rm -f "$stamp"
    exit $rc ;;
  report)
    python3 -m evals.gsm8k --report --out-dir "$RES/$TAG" && cp "$RES/$TAG/report.md" "$RES/$TAG/summary.json" "$OUT"/ ;;
  *) echo "unknown step $step (setup, gsm8k MODE..., report; startup time: evals/gpu_e2e.sh real)" >&2; exit 2 ;;
esac
