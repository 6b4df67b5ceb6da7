#!/usr/bin/env bash
# Stop the local Slurm of cluster/local/up.sh: its jobs (scancel), then only its own daemons, by their pid files under
# $KNOWLIP_SLURM_STATE (default /tmp/knowlip-slurm), in the reverse order of their start. The state (job
# history, database) stays; `--purge` removes the folder too. `--nodes 2` (default state /tmp/knowlip-slurm2)
# also removes what up.sh --nodes 2 made: the two network namespaces (and so the veth pair) and the hosts lines.
set -uo pipefail
NODES=1 PURGE=
while [ $# -gt 0 ]; do  # as up.sh parses them
  case $1 in
    --nodes) NODES=${2:-}; shift $(( $# > 1 ? 2 : 1 )) ;;
    --nodes=*) NODES=${1#*=}; shift ;;
    --purge) PURGE=1; shift ;;
    *) echo "usage: down.sh [--nodes 1|2] [--purge]"; exit 2 ;;
  esac
done
[ "$NODES" = 1 ] || [ "$NODES" = 2 ] || { echo "down.sh: --nodes must be 1 or 2, not '$NODES'"; exit 2; }
STATE=${KNOWLIP_SLURM_STATE:-/tmp/knowlip-slurm$([ "$NODES" = 2 ] && echo 2)}
[ -f "$STATE/etc/nodes" ] && NODES=$(cat "$STATE/etc/nodes")
CTL=()
[ "$NODES" = 2 ] && [ -e /var/run/netns/knowlip-node1 ] && CTL=(nsenter --net=/var/run/netns/knowlip-node1)
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
  jobs=$(SLURM_CONF=$STATE/etc/slurm.conf "${CTL[@]}" timeout 10 squeue -h -o %A 2>/dev/null)
  if [ -n "$jobs" ]; then
    SLURM_CONF=$STATE/etc/slurm.conf "${CTL[@]}" timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 50); do
      [ -z "$(SLURM_CONF=$STATE/etc/slurm.conf "${CTL[@]}" timeout 10 squeue -h -o %A 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi
for pidfile in run/slurmd.pid run/slurmd.node1.pid run/slurmd.node2.pid run/slurmctld.pid run/slurmdbd.pid \
    run/mariadb.pid munge/munged.pid; do
  stop "$STATE/$pidfile"
done
if [ "$NODES" = 2 ]; then
  for ns in knowlip-node1 knowlip-node2; do
    [ -e /var/run/netns/$ns ] && ip netns del $ns  # takes its end of the veth pair (and so the pair) with it
  done
  sed -i '/# knowlip-local2$/d' /etc/hosts
fi
[ -n "$PURGE" ] && rm -rf "$STATE"
echo "local Slurm cluster stopped (state in $STATE${PURGE:+, purged})"
