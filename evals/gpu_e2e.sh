#!/usr/bin/env bash
# End-to-end on a machine with a Hopper GPU, against upstream vLLM 0.26.0 (its MoE steps need
# vLLM's _moe_C too). vLLM comes from the Python environment, or from an unpacked vLLM tree in
# $VB (sourced from $VB/activate.sh when that exists; the setup step unpacks one from
# .vllm-bundle/part2/unpack.sh when present). Run steps in one invocation or in several in a row:
#   bash evals/gpu_e2e.sh STEP...
# The tests and the benchmark have a driver of their own (benchmarks/gpu_suite.sh), gsm8k too
# (evals/gpu_gsm8k.sh); this one runs vLLM end to end. Steps:
#   setup     vLLM in $VB if not there yet, build the extension, install the plugin
#   tiny, 8b, 70b            dense synthetic checkpoints: startup time ours vs upstream, output identity
#   moe-tiny  the tiny-moe synthetic checkpoint (eager and compiled)
#   moe       a Qwen3-30B-A3B-shaped synthetic checkpoint (all 48 layers, 128 experts, attention
#             W4AFP8 too), --enforce-eager: startup ours vs upstream, output identity
#   moe-58x256  the same with DeepSeek-V3's count of expert tensors (58 layers x 256 experts,
#             ~36 GB; LAYERS=N fewer), as the moe step
#   blockread the Qwen3-30B-A3B-shaped checkpoint's expert bytes read and sent as the load format
#             w4a8_fastprep does, per reader thread count and piece size, against the host link
#             (benchmarks/bench_block_read.py; READ_ARGS, default "--threads 4,8,16 --piece-mib
#             64,256,1024")
#   reload    the tiny MoE checkpoint (W4AFP8 attention: dense layers, and MoE layers): generate,
#             vLLM's reload_weights (layer-wise reload from the checkpoint), generate again
#             (identical to before), reload from a second checkpoint of other weights (seed 1),
#             generate. --enforce-eager, each mode: ours identical to upstream at every stage
#             (upstream reloads under the worker's config: vLLM 0.26.0's own entry point sets
#             none and its MoE preparation needs one; ours uses the entry point as it is). With
#             CUDA graphs (vLLM's default), ours: after the reload from the second checkpoint
#             identical to a fresh start on it (upstream's reload under CUDA graphs reads freed
#             memory: UPSTREAM_GRAPHS=1 runs it too)
#   registration  what the plugin costs every vLLM process: load_general_plugins(), `vllm serve
#             --help`, and with MODEL=DIR the time until `vllm serve DIR` answers /health; with
#             and without the plugin, RUNS (default 3) alternating runs each (SERVE_ARGS: the
#             `vllm serve` arguments, default --max-model-len 1024)
#   real      MODEL=DIR (a real W4AFP8 checkpoint): startup time ours vs upstream on it, RUNS
#             (default 3) runs per mode, --timeout 150 and STARTUP_ARGS; each mode's first log to
#             $OUT; the script exits 1 when this step failed, 2 without MODEL
#   serve     MODEL=DIR (a real W4AFP8 checkpoint; gsm8k data in .gsm8k-data/): `vllm serve DIR`
#             answered by the OpenAI client, upstream then ours (evals.serve_check: gsm8k
#             completions, chat, streaming; SERVE_ARGS as above, SERVE_CHECK_ARGS more flags)
# Each synthetic checkpoint is removed after its step (KEEP=1 keeps them). RUNS sets the
# vLLM starts per mode, STARTUP_ARGS adds startup_time arguments (e.g. "--modes
# upstream,ours,ours-staged,ours-blocks": also the plugin with its opt-in staged MoE expert loading,
# and with --load-format w4a8_fastprep). Every startup_time run has
# --in-process-engine (vLLM's engine core in the run's own process): the same outputs on every
# run, so that ours vs upstream is an exact comparison.
# Summaries and charts go to $OUT.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
WORK=${WORK:-${TMPDIR:-/tmp}/e2e}; mkdir -p "$WORK"
export VB=${VB:-$HOME/vb}  # an unpacked vLLM tree, if vLLM is not installed
export PYTHONUNBUFFERED=1
[[ -f $VB/activate.sh ]] && source $VB/activate.sh

startup() {  # name, model dir, extra args
  local name=$1 model=$2; shift 2
  local dir="$WORK/startup-$name"  # not "$WORK/$name": the checkpoint folders are named so
  rm -rf "$dir" "$OUT/$name.json" "$OUT/$name.png"  # no earlier results left to copy
  python3 -m evals.startup_time --model "$model" --out-dir "$dir" --in-process-engine \
    "$@" 2>&1 \
    | grep -v "it/s\]$" | tail -14
  local rc=${PIPESTATUS[0]}
  echo "$name: startup_time rc=$rc"
  cp "$dir/summary.json" "$OUT/$name.json" 2>/dev/null
  cp "$dir/startup_time.png" "$OUT/$name.png" 2>/dev/null
  return "$rc"
}

synth() {  # dir, synth args... (a checkpoint left by an earlier KEEP=1 run is replaced)
  local dir=$1; shift
  rm -rf "$dir"
  python3 -m vllm_w4a8_fastprep synth "$dir" "$@" > "$WORK/synth.log" 2>&1 \
    || { tail -5 "$WORK/synth.log"; return 1; }
  du -sh "$dir" | cut -f1 | sed "s|^|$(basename "$dir"): |"
}

reload_run() {  # name, model dir, second model dir, mode, tag, run_llm arguments...
  local name=$1 model=$2 other=$3 mode=$4 tag=$5; shift 5
  local out="$OUT/reload-$name-$tag-$mode.json" log="$WORK/reload-$name-$tag-$mode.log"
  rm -f "$out"
  VLLM_ENABLE_V1_MULTIPROCESSING=0 python3 -m evals.run_llm "$model" --mode $mode --reload \
    --reload-from "$other" --out "$out" "$@" > "$log" 2>&1
  echo "reload $name $tag $mode: rc=$? $(grep -h 'run_llm:' "$log" | tr '\n' ' ')"
  [[ -f $out ]] || grep -h -m3 -E 'Error|error:' "$log"
}

reload_check() {  # name, model dir, second model dir: see the step's description above
  local name=$1 model=$2 other=$3
  reload_run "$name" "$model" "$other" upstream eager --enforce-eager --reload-under-config
  reload_run "$name" "$model" "$other" ours eager --enforce-eager
  reload_run "$name" "$model" "$other" ours graphs
  [[ ${UPSTREAM_GRAPHS:-0} == 1 ]] \
    && reload_run "$name" "$model" "$other" upstream graphs --reload-under-config
  rm -f "$OUT/fresh-$name-graphs-ours.json"
  VLLM_ENABLE_V1_MULTIPROCESSING=0 python3 -m evals.run_llm "$other" --mode ours \
    --out "$OUT/fresh-$name-graphs-ours.json" > "$WORK/fresh-$name.log" 2>&1
  echo "fresh start on the second checkpoint, ours, CUDA graphs: rc=$?"
  python3 - "$OUT" "$name" <<'PY' || echo "$name: not comparable (a run wrote no result, or a reload failed: above)"
import json, sys
out, name = sys.argv[1:]
a, b, g, f = (json.load(open(f"{out}/{x}")) for x in (
    f"reload-{name}-eager-ours.json", f"reload-{name}-eager-upstream.json",
    f"reload-{name}-graphs-ours.json", f"fresh-{name}-graphs-ours.json"))
failed = [f"{r['mode']} {t}: {r[k]['error']}" for t, r in (("eager", a), ("eager", b),
          ("graphs", g)) for k in ("reload", "reload_from") if "error" in r.get(k, {})]
if failed:
    sys.exit(f"{name}: a reload failed: " + "; ".join(failed))
for what, x, y in (("first load", a["outputs"], b["outputs"]),
                   ("after reload", a["reload"]["outputs"], b["reload"]["outputs"]),
                   ("after reload from the second checkpoint", a["reload_from"]["outputs"],
                    b["reload_from"]["outputs"])):
    print(f"eager, ours vs upstream, {what}:", "identical" if x == y else "DIFFER")
print("CUDA graphs, ours: after reload", "identical" if g["reload"]["identical"] else "DIFFER",
      "to before; after reload from the second checkpoint",
      "identical" if g["reload_from"]["outputs"] == f["outputs"] else "DIFFER",
      "to a fresh start on it; new weights give other outputs:",
      not g["reload_from"]["same_as_before"])
for tag, r in (("eager", a), ("graphs", g)):
    print(f"ours {tag}: 'prepared' summaries after load, reload, reload from:",
          r["prepared_summaries"], r["reload"]["prepared_summaries"],
          r["reload_from"]["prepared_summaries"])
PY
  done_with "$model"; done_with "$other"
}

done_with() {  # remove a synthetic checkpoint unless KEEP=1
  [[ ${KEEP:-0} == 1 ]] || rm -rf "$1"
}

for step in "$@"; do
  echo "=== $step ($(date -u +%T)) commit ${W4A8_FASTPREP_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
  case $step in
    setup)
      if [[ ! -f $VB/vllm/__init__.py ]] && ! python3 -c "import vllm" 2> /dev/null; then
        [[ -f .vllm-bundle/part2/unpack.sh ]] \
          || { echo "vLLM is not importable and there is nothing to unpack into $VB" >&2; exit 1; }
        bash .vllm-bundle/part2/unpack.sh || exit 1
      fi
      [[ -f $VB/activate.sh ]] && source $VB/activate.sh
      MAX_JOBS=8 python3 setup.py build_ext --inplace > "$WORK/build.log" 2>&1 \
        || { tail -30 "$WORK/build.log"; exit 1; }
      python3 -m pip install -q --no-build-isolation --no-deps -e . > "$WORK/pip.log" 2>&1 \
        || { tail -20 "$WORK/pip.log"; exit 1; } ;;
    tiny)
      synth "$WORK/tiny" || continue
      startup tiny-eager "$WORK/tiny" --runs 1 --enforce-eager
      startup tiny-compiled "$WORK/tiny" --runs 1
      done_with "$WORK/tiny" ;;
    8b)
      synth "$WORK/8b" --preset 8b --device cuda || continue
      startup 8b "$WORK/8b" --runs ${RUNS:-2} ${STARTUP_ARGS:-}
      done_with "$WORK/8b" ;;
    70b)
      synth "$WORK/70b" --preset 70b --layers ${LAYERS_70B:-80} --device cuda || continue
      df -h "$WORK" | tail -1
      startup 70b "$WORK/70b" --runs ${RUNS:-1} ${STARTUP_ARGS:-}
      done_with "$WORK/70b" ;;
    moe-tiny)
      synth "$WORK/moe-tiny" --preset tiny-moe || continue
      startup moe-tiny-eager "$WORK/moe-tiny" --runs 1 --enforce-eager
      startup moe-tiny-compiled "$WORK/moe-tiny" --runs 1
      done_with "$WORK/moe-tiny" ;;
    reload)
      synth "$WORK/tiny-moe" --preset tiny-moe && synth "$WORK/tiny-moe-2" --preset tiny-moe --seed 1 \
        && reload_check tiny-moe "$WORK/tiny-moe" "$WORK/tiny-moe-2" ;;
    registration)
      python3 -m evals.registration_cost --runs ${RUNS:-3} --json "$OUT/registration.json" \
        ${MODEL:+--model "$MODEL" --serve-args "${SERVE_ARGS:---max-model-len 1024}"} 2>&1 | tail -8
      echo "registration_cost rc=${PIPESTATUS[0]}" ;;
    real)
      [[ -n ${MODEL:-} && -f ${MODEL:-}/config.json ]] \
        || { echo "real: MODEL=DIR is needed (a W4AFP8 checkpoint folder)" >&2; status=2; continue; }
      startup real "$MODEL" --runs ${RUNS:-3} --timeout 150 ${STARTUP_ARGS:-} || status=1
      for log in "$WORK/startup-real"/{ours,upstream}-0.log; do  # one log per mode
        [[ -f $log ]] && grep -vE "it/s\]|s/it\]|^\s*$" "$log" | tail -200 \
          > "$OUT/real-$(basename "$log")"
      done ;;
    serve)
      [[ -n ${MODEL:-} ]] || { echo "serve: MODEL=DIR is needed (a W4AFP8 checkpoint)"; continue; }
      # shellcheck disable=SC2086  # SERVE_CHECK_ARGS holds several flags
      rm -rf "$WORK/serve-check" "$OUT/serve-check.json"  # no earlier results left to copy
      python3 -m evals.serve_check --model "$MODEL" --out-dir "$WORK/serve-check" \
        --serve-args "${SERVE_ARGS:---max-model-len 4096}" ${SERVE_CHECK_ARGS:-} 2>&1 | tail -24
      echo "serve_check rc=${PIPESTATUS[0]}"
      cp "$WORK/serve-check/summary.json" "$OUT/serve-check.json" 2>/dev/null ;;
    moe)
      synth "$WORK/moe" --preset qwen3-30b-a3b --device cuda || continue
      df -h "$WORK" | tail -1
      startup moe "$WORK/moe" --runs ${RUNS:-1} --enforce-eager ${STARTUP_ARGS:-}
      done_with "$WORK/moe" ;;
    blockread)
      synth "$WORK/moe" --preset qwen3-30b-a3b --device cuda || continue
      # shellcheck disable=SC2086  # READ_ARGS holds several flags
      python3 benchmarks/bench_block_read.py "$WORK/moe" ${READ_ARGS:---threads 4,8,16 --piece-mib 64,256,1024} \
        --json "$OUT/block-read.json" 2>&1 | tee "$OUT/block-read.log" | tail -30
      echo "bench_block_read rc=${PIPESTATUS[0]}"
      done_with "$WORK/moe" ;;
    moe-58x256)
      synth "$WORK/moe-58x256" --preset moe-58x256 ${LAYERS:+--layers $LAYERS} --device cuda \
        || continue
      df -h "$WORK" | tail -1
      startup moe-58x256 "$WORK/moe-58x256" --runs ${RUNS:-1} --enforce-eager ${STARTUP_ARGS:-}
      done_with "$WORK/moe-58x256" ;;
    *)
      echo "unknown step '$step' (setup tiny 8b 70b moe-tiny moe blockread moe-58x256 reload registration real serve; tests and the benchmark: benchmarks/gpu_suite.sh)"
      exit 2 ;;
  esac
done
exit "${status:-0}"  # a failed real step (the others print their rc)
