#!/usr/bin/env bash
# Stop the local Slurm of cluster/local/up.sh: its jobs (scancel), then only its own daemons, by their pid files under
# $KNOWLIP_SLURM_STATE (default /tmp/knowlip-slurm), in the reverse order of their start. The state (job
# history, database) stays; `--purge` removes the folder too.
set -uo pipefail
STATE=${KNOWLIP_SLURM_STATE:-/tmp/knowlip-slurm}
stop() {  # stop PIDFILE: TERM, up to 10 s, then KILL
  local pidfile=$1 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile" 2>/dev/null)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  fi
  rm -f "$pidfile"
}
# Jobs first: their slurmstepd and task processes would outlive the daemons.
if [ -f "$STATE/etc/slurm.conf" ] && [ -f "$STATE/run/slurmctld.pid" ] && kill -0 "$(cat "$STATE/run/slurmctld.pid")" 2>/dev/null; then
  jobs=$(SLURM_CONF=$STATE/etc/slurm.conf timeout 10 squeue -h -o %A 2>/dev/null)
  if [ -n "$jobs" ]; then
    SLURM_CONF=$STATE/etc/slurm.conf timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 50); do
      [ -z "$(SLURM_CONF=$STATE/etc/slurm.conf timeout 10 squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2
    done
  fi
fi
for pidfile in run/slurmd.pid run/slurmctld.pid run/slurmdbd.pid run/mariadb.pid munge/munged.pid; do
  stop "$STATE/$pidfile"
done
[ "${1:-}" = "--purge" ] && rm -rf "$STATE"
echo "local Slurm cluster stopped (state in $STATE${1:+, purged})"
