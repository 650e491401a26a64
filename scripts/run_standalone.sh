#!/bin/bash
# One-device run of the MindSpore ChatGLM2 runner, as mindformers' scripts/run_standalone.sh:
#   bash scripts/run_standalone.sh CONFIG_PATH DEVICE_ID RUN_STATUS [extra flags of mindspore_glm.run]
#   RUN_STATUS: train | finetune | eval | predict
# The log goes to output/log/<RUN_STATUS>_device<DEVICE_ID>_<time>.log (and to the terminal).
set -o pipefail

usage() {
  cat <<USAGE
Usage: bash scripts/run_standalone.sh CONFIG_PATH DEVICE_ID RUN_STATUS [--flag value ...]
  CONFIG_PATH  run YAML (configs/glm2/*.yaml on Ascend, configs/tiny/*.yaml on CPU)
  DEVICE_ID    device number, 0..7
  RUN_STATUS   train, finetune, eval or predict
  extra flags go to: python -m mindspore_glm.run (--load_checkpoint, --predict_data, --train_steps, ...)
Example: bash scripts/run_standalone.sh configs/glm2/run_glm2_6b_lora.yaml 0 finetune
USAGE
}

if [ "$1" = "-h" ] || [ "$1" = "--help" ]; then usage; exit 0; fi
if [ $# -lt 3 ]; then
  echo "error: expected CONFIG_PATH DEVICE_ID RUN_STATUS, got $# argument(s)" >&2; usage >&2; exit 2
fi
CONFIG_PATH=$1; DEVICE_ID=$2; RUN_STATUS=$3; shift 3
if [ ! -f "$CONFIG_PATH" ]; then
  echo "error: CONFIG_PATH: $CONFIG_PATH: no such file" >&2; exit 2
fi
if ! [[ "$DEVICE_ID" =~ ^[0-9]+$ ]] || [ "$DEVICE_ID" -gt 7 ]; then
  echo "error: DEVICE_ID: expected an integer 0..7, got '$DEVICE_ID'" >&2; exit 2
fi
case "$RUN_STATUS" in
  train|finetune|eval|predict) ;;
  *) echo "error: RUN_STATUS: expected train, finetune, eval or predict, got '$RUN_STATUS'" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python )}
LOG_DIR=${LOG_DIR:-output/log}
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/${RUN_STATUS}_device${DEVICE_ID}_$(date +%Y%m%d_%H%M%S).log"
export DEVICE_ID RANK_ID=0 RANK_SIZE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
echo "run_standalone: $RUN_STATUS $CONFIG_PATH on device $DEVICE_ID; log: $LOG"
"$PYTHON" -m mindspore_glm.run --config "$CONFIG_PATH" --run_mode "$RUN_STATUS" --device_id "$DEVICE_ID" \
  --use_parallel False "$@" 2>&1 | tee "$LOG"
status=$?
echo "run_standalone: exit status $status; log: $LOG"
exit $status
