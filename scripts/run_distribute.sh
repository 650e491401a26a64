#!/usr/bin/env bash
# Supervised data-parallel launch of mindspore_glm.run: mindformers' run_distribute.sh interface.
#
#   bash scripts/run_distribute.sh RANK_TABLE_FILE CONFIG_PATH DEVICE_RANGE RUN_STATUS [RANK_SIZE] [PREDICT_DATA ...]
#   bash scripts/run_distribute.sh /path/hccl_8p_01234567_10.0.0.1.json configs/glm2/run_glm2_6b_finetune.yaml '[0,8]' finetune
#   bash scripts/run_distribute.sh - configs/tiny/run_tiny_lora.yaml '[0,2]' finetune      # CPU: no rank table
#
# This file checks the command line's shape and hands over to the launcher, python -m mindspore_glm.launch,
# which validates everything (rank table, config, range) before it starts a process, gives every rank
# its RANK_TABLE_FILE/RANK_SIZE/RANK_ID/DEVICE_ID, working directory and log, and stops all ranks
# when one fails or on Ctrl-C. `--help` lists the options.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$SCRIPT_DIR")"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n "${PYTHON:-}" ]]; then
  :
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PYTHON="$ROOT/.venv/bin/python"
else
  PYTHON="$(command -v python3 || command -v python)"
fi

usage() {
  cat <<EOF
Usage: bash run_distribute.sh [options] RANK_TABLE_FILE CONFIG_PATH DEVICE_RANGE RUN_STATUS [RANK_SIZE] [PREDICT_DATA ...] [-- RUN_ARGS ...]
  one node:     bash run_distribute.sh hccl_8p_01234567_10.0.0.1.json configs/glm2/run_glm2_6b_finetune.yaml '[0,8]' finetune
  multi-node:   bash run_distribute.sh cluster_16p.json configs/glm2/run_glm2_6b_lora.yaml '[8,16]' finetune 16
  CPU cluster:  bash run_distribute.sh - configs/tiny/run_tiny_lora.yaml '[0,2]' finetune -- --train_steps 4
EOF
}

# --help before anything else, with the supervisor's full option list
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; echo; exec "$PYTHON" -m mindspore_glm.launch --help ;;
    --) break ;;
  esac
done

# count the positional arguments (options and what follows "--" aside)
positional=0
skip_value=0
for arg in "$@"; do
  if (( skip_value )); then skip_value=0; continue; fi
  case "$arg" in
    --) break ;;
    --output|--grace|--port|--master-addr|--cluster-timeout|--tail|--launcher|--device-memory) skip_value=1 ;;
    --*) ;;
    *) positional=$((positional + 1)) ;;
  esac
done
if (( positional < 4 )); then
  echo "run_distribute.sh: error: expected RANK_TABLE_FILE CONFIG_PATH DEVICE_RANGE RUN_STATUS, got $positional argument(s)" >&2
  usage >&2
  exit 2
fi

# the launcher imports no framework (mindspore_glm imports MindSpore lazily); the ranks do
exec "$PYTHON" -m mindspore_glm.launch "$@"
