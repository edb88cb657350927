# Sourced by train_h800.sh and train_2node_h800.sh: turns environment variables into the
# arguments of `python -m training.train` (array `train_args`) and runs a launcher command.
# Every variable has a default; the names of the VGGT variables are the training flags' own.
#
# Paths:    MODEL (default Qwen/Qwen2.5-VL-3B-Instruct; qwen2.5-vl-tiny for a CPU smoke run),
#           DATA_ROOT (default data), ANNOTATIONS (space-separated files, default
#           $DATA_ROOT/annotations.json), OUTPUT_DIR (default runs/qwen2.5-vl-vggt),
#           DEEPSPEED (default training/configs/zero2.json; "none" for no DeepSpeed).
# VGGT:     USE_VGGT_CACHE=true reads features from the store (VGGT is never built);
#           VGGT_CACHE_PATH (default <DATA_ROOT>/vggt_features.lmdb), VGGT_CACHE_MISS
#           (error|compute, default error); otherwise VGGT runs online: VGGT_MODE
#           (online_full|online_causal_stream; unset: training picks online_full for per_image,
#           online_causal_stream for last_to_all). VGGT_WEIGHTS in both modes (vggt-1b needs
#           them: online they are loaded, with the cache the store is checked against their sha256).
#           VGGT_FUSION (per_image|last_to_all), VGGT_SCALE (JanusVLN: 0.2), VGGT_ENCODER,
#           VGGT_LAYER, VGGT_ATTENTION, VGGT_FRAMES_KEPT, VGGT_TARGET_SIZE, VGGT_PREPROCESS_MODE
#           (unset: training's defaults, which match `featstore build`'s).
# Recipe:   RECIPE=vgllm|janusvln passes --recipe: every VGGT, fusion, pixel, what-trains and
#           learning-rate setting of that repository's published script (docs/TRAINING.md); the
#           TUNE_* and LR variables then override it only where given, and VGGT_* as always.
# Vision:   USE_VISION_CACHE=true reads the frozen Qwen vision tower's output from the same store
#           (feature set qwen_vision; VGGT_CACHE_PATH names it); the model holds no vision block.
# Training: TUNE_MERGER (true), TUNE_LLM (true), TUNE_VISION (false), TUNE_VISION_MERGER (true:
#           the navigation recipes train visual.merger, JanusVLN's tune_mm_mlp), BATCH_SIZE (per GPU, 1),
#           GRAD_ACCUM (8), LR (1e-5), EPOCHS (1), MAX_STEPS (-1: EPOCHS decide), WORKERS
#           (DataLoader workers per GPU, 4), LOGGING_STEPS (10), SAVE_STEPS (1000), BF16 (true),
#           GRADIENT_CHECKPOINTING (true), SEED (42), USE_CPU (false; true for a CPU smoke run).
# Run:      PYTHON (default python), DRY_RUN=1 prints the command and exits, EXTRA (more flags,
#           word-split), LOG_FILE (default $OUTPUT_DIR/train.log; output is also shown).

PYTHON=${PYTHON:-python}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODEL=${MODEL:-Qwen/Qwen2.5-VL-3B-Instruct}
DATA_ROOT=${DATA_ROOT:-data}
ANNOTATIONS=${ANNOTATIONS:-$DATA_ROOT/annotations.json}
OUTPUT_DIR=${OUTPUT_DIR:-runs/qwen2.5-vl-vggt}
USE_VGGT_CACHE=${USE_VGGT_CACHE:-false}
USE_VISION_CACHE=${USE_VISION_CACHE:-false}

train_args=(--model_name_or_path "$MODEL" --data_root "$DATA_ROOT" --annotations $ANNOTATIONS
            --output_dir "$OUTPUT_DIR")
if [ -n "${RECIPE:-}" ]; then
  # The recipe sets what trains and the learning rates: only the variables given override it.
  train_args+=(--recipe "$RECIPE")
  for pair in TUNE_MERGER:tune_merger TUNE_LLM:tune_llm TUNE_VISION:tune_vision \
              TUNE_VISION_MERGER:tune_vision_merger LR:learning_rate; do
    name=${pair%%:*}
    [ -n "${!name:-}" ] && train_args+=("--${pair#*:}" "${!name}")
  done
else
  train_args+=(--tune_merger "${TUNE_MERGER:-true}" --tune_llm "${TUNE_LLM:-true}"
               --tune_vision "${TUNE_VISION:-false}" --tune_vision_merger "${TUNE_VISION_MERGER:-true}"
               --learning_rate "${LR:-1e-5}")
fi
train_args+=(--per_device_train_batch_size "${BATCH_SIZE:-1}" --gradient_accumulation_steps "${GRAD_ACCUM:-8}"
            --num_train_epochs "${EPOCHS:-1}" --max_steps "${MAX_STEPS:--1}"
            --dataloader_num_workers "${WORKERS:-4}" --logging_steps "${LOGGING_STEPS:-10}"
            --save_steps "${SAVE_STEPS:-1000}" --bf16 "${BF16:-true}"
            --gradient_checkpointing "${GRADIENT_CHECKPOINTING:-true}" --seed "${SEED:-42}" --report_to none)
case "$USE_VGGT_CACHE" in
  true)  train_args+=(--use_vggt_cache --vggt_cache_miss "${VGGT_CACHE_MISS:-error}") ;;
  false) [ -n "${VGGT_MODE:-}" ] && train_args+=(--vggt_mode "$VGGT_MODE") ;;
  *)     echo "USE_VGGT_CACHE=$USE_VGGT_CACHE: set it to true or false" >&2; exit 2 ;;
esac
# In both modes: online VGGT loads them; the cache is checked against their sha256 (the store's
# fingerprint), so vggt-1b needs them either way.
[ -n "${VGGT_WEIGHTS:-}" ] && train_args+=(--vggt_weights "$VGGT_WEIGHTS")
case "$USE_VISION_CACHE" in
  true)  train_args+=(--use_vision_cache) ;;
  false) ;;
  *)     echo "USE_VISION_CACHE=$USE_VISION_CACHE: set it to true or false" >&2; exit 2 ;;
esac
# The store path is read by either cache (one store holds both feature sets).
if [ -n "${VGGT_CACHE_PATH:-}" ] && { [ "$USE_VGGT_CACHE" = true ] || [ "$USE_VISION_CACHE" = true ]; }; then
  train_args+=(--vggt_cache_path "$VGGT_CACHE_PATH")
fi
# Set only what is given: training's own defaults (those of `featstore build`) stay in one place.
for var in FUSION SCALE ENCODER LAYER ATTENTION FRAMES_KEPT TARGET_SIZE PREPROCESS_MODE; do
  name=VGGT_$var
  [ -n "${!name:-}" ] && train_args+=("--vggt_${var,,}" "${!name}")
done
DEEPSPEED=${DEEPSPEED:-$REPO/training/configs/zero2.json}
[ "$DEEPSPEED" != none ] && train_args+=(--deepspeed "$DEEPSPEED")
[ "${USE_CPU:-false}" = true ] && train_args+=(--use_cpu)
train_args+=(${EXTRA:-})

# run_logged CMD...: print CMD (shell-quoted, paste-able), then run it unless DRY_RUN=1, its
# output shown and appended to LOG_FILE. Exit status is CMD's.
run_logged() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  [ "${DRY_RUN:-0}" = 1 ] && return 0
  local log=${LOG_FILE:-$OUTPUT_DIR/train.log}
  mkdir -p "$(dirname "$log")"
  # The repo importable (python -m training.train) and the interpreter's bin/ on PATH: torch
  # looks for the `ninja` that DeepSpeed's first-run JIT build needs there.
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PATH="$(dirname "$(command -v "$PYTHON")"):$PATH" \
    "$@" 2>&1 | tee -a "$log"
}
