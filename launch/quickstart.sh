#!/usr/bin/env bash
# The main job on the embedded default (configs/default.yaml, or $CONFIG): synthesise a small SAR world,
# pack it into shards, inspect them, then train the tiny model on the CPU (or the GPU when there is one).
# Extra arguments are config overrides (key=value) applied to every step. SUBMIT=CLUSTER trains through Slurm
# instead (`knowlip submit --cluster CLUSTER --wait`; launch/quickstart_slurm.sh starts the local cluster first).
set -euo pipefail
cd "$(dirname "$0")/.."
KNOWLIP=.venv/bin/knowlip
CONFIG=${CONFIG:-configs/default.yaml}

SHARDS=$(.venv/bin/python -c 'import sys; from knowlip.config import load_config; print(load_config(sys.argv[1], sys.argv[2:]).pack.out_dir)' "$CONFIG" "$@")
if [ -f "$SHARDS/index.json" ]; then  # a second run (e.g. to resume training) keeps the dataset it trained on
  echo "quickstart: $SHARDS already holds the packed dataset; not packing again"
else
  $KNOWLIP synth -c "$CONFIG" "$@"
  $KNOWLIP pack -c "$CONFIG" "$@"
fi
$KNOWLIP data inspect "$SHARDS"
if [ -n "${SUBMIT:-}" ]; then
  $KNOWLIP submit --cluster "$SUBMIT" --wait -c "$CONFIG" "$@"
  $KNOWLIP jobs --cluster "$SUBMIT" --last 1
else
  $KNOWLIP train -c "$CONFIG" "$@"
fi
