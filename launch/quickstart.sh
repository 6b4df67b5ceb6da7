#!/usr/bin/env bash
# The main job on the embedded default: synthesise a small SAR world, pack it into shards, inspect them,
# then train the tiny model when the training engine is present. Every step reads configs/default.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
KNOWLIP=.venv/bin/knowlip
CONFIG=${CONFIG:-configs/default.yaml}

$KNOWLIP synth -c "$CONFIG" "$@"
$KNOWLIP pack -c "$CONFIG" "$@"
$KNOWLIP data inspect "$(.venv/bin/python -c "from knowlip.config import load_config; import sys; print(load_config('$CONFIG', sys.argv[1:]).pack.out_dir)" "$@")"
if $KNOWLIP train --help >/dev/null 2>&1; then
  $KNOWLIP train -c "$CONFIG" "$@"
else
  echo "quickstart: shards are ready; training is not part of knowlip yet (the engine lands in a later release)."
fi
