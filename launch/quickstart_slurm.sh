#!/usr/bin/env bash
# The quickstart through a real Slurm on this machine: install the Debian packages if missing (as root), start
# the local cluster (cluster/local/up.sh), then synthesise, pack and submit the training job to it
# (2 tasks = 2 ranks) and wait for it. Stop the cluster afterwards with cluster/local/down.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash cluster/local/install.sh
eval "$(bash cluster/local/up.sh | grep '^export ')"
SUBMIT=local bash launch/quickstart.sh "$@"
