#!/usr/bin/env bash
# Debian's packages for the local Slurm cluster (cluster/local/up.sh): slurmctld/slurmd, slurmdbd, munge and
# MariaDB, plus any named as arguments (`make test` adds chromium, for the MLflow UI screenshot test).
# Installs only what is missing, and only where it can (root with apt-get); elsewhere it says what to install
# and exits 0, and the tests that need them skip with that reason.
set -u
packages=(slurm-wlm slurmdbd munge mariadb-server "$@")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "test packages: not installing ${missing[*]} (needs root and apt-get); its tests will skip"
  exit 0
fi
echo "test packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
  || { echo "apt-get install ${missing[*]} failed"; exit 1; }
