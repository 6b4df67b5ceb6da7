#!/usr/bin/env bash
# Start a real single-node Slurm on this machine from Debian's packages (cluster/local/install.sh):
# munged, MariaDB + slurmdbd (accounting: sacct, requeue history, cancelled-job detection), slurmctld, slurmd.
# Everything lives under one folder ($KNOWLIP_SLURM_STATE, default /tmp/knowlip-slurm): configs, spool,
# logs, pid files, the database. Idempotent: a daemon whose pid file names a live process is left alone.
# Stop with cluster/local/down.sh. Outside that folder it touches only /run/munge/munge.socket.2 (a link to
# its munge socket, for the clients that ignore AuthInfo). Clients need SLURM_CONF=$STATE/etc/slurm.conf (printed last;
# cluster/local.yaml sets it for `knowlip submit`).
#
# Why these settings (../shared/notes/slurm-local.md): no systemd or cgroups in a sandbox (linuxproc, task/none),
# EnforcePartLimits=ALL so an impossible request fails at sbatch instead of pending forever, 1 s scheduler
# intervals and cred_expire=5 so a requeued job restarts in seconds rather than about two minutes.
#
# `--nodes 2`: two hosts on this one machine (../shared/notes/slurm-multinode.md): network namespaces
# knowlip-node1 and knowlip-node2 joined by a veth pair ($KNOWLIP_SLURM_NET.1 and .2, default 10.231.0.x),
# host names node1 and node2 (lines tagged "# knowlip-local2" in /etc/hosts), one slurmd in each (nsenter +
# unshare -u, so each has its own host name), MariaDB, slurmdbd and slurmctld in node1's namespace. Clients
# (sbatch, sinfo, `knowlip submit --cluster local2`) must run there: nsenter --net=/var/run/netns/knowlip-node1 CMD.
# State defaults to /tmp/knowlip-slurm2.
#
# Safety on a shared machine: the state folder must be owned by this user (root) and writable by no one else,
# else up.sh refuses it (another user could have planted a munge key or configs there); munged gets a new random
# key each time it starts; the database password is generated (kept in $STATE/etc, mode 600), never a constant.
set -euo pipefail
trap 'echo "up.sh: failed (exit $?) at line $LINENO: $BASH_COMMAND${STATE:+; logs in $STATE/log}" >&2' ERR
NODES=1
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) NODES=${2:-}; shift $(( $# > 1 ? 2 : 1 )) ;;
    --nodes=*) NODES=${1#*=}; shift ;;
    *) echo "usage: up.sh [--nodes 1|2]"; exit 2 ;;
  esac
done
[ "$NODES" = 1 ] || [ "$NODES" = 2 ] || { echo "up.sh: --nodes must be 1 or 2, not '$NODES'"; exit 2; }
DEFAULT_STATE=/tmp/knowlip-slurm
[ "$NODES" = 2 ] && DEFAULT_STATE=/tmp/knowlip-slurm2
STATE=${KNOWLIP_SLURM_STATE:-$DEFAULT_STATE}
PORT=${KNOWLIP_SLURM_PORT:-16817}  # slurmctld; slurmd, slurmdbd and MariaDB take the next three
CTLD_PORT=$PORT D_PORT=$((PORT + 1)) DBD_PORT=$((PORT + 2)) DB_PORT=$((PORT + 3))
CLUSTER=knowlip
HOST=$(hostname -s)

for tool in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sacctmgr; do
  command -v "$tool" >/dev/null || PATH=$PATH:/usr/sbin
  command -v "$tool" >/dev/null || { echo "missing $tool: run cluster/local/install.sh (as root)"; exit 2; }
done

alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }
wait_for() {  # wait_for SECONDS WHAT CMD...: poll until CMD succeeds
  local what=$2 deadline=$((SECONDS + $1)); shift 2
  while [ $SECONDS -lt $deadline ]; do timeout 10 "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "local Slurm: $what did not come up in time; logs in $STATE/log"; exit 1
}

if [ -L "$STATE" ]; then
  echo "up.sh: $STATE is a symbolic link; refusing it (set KNOWLIP_SLURM_STATE to a folder of your own)" >&2; exit 2
fi
if [ -e "$STATE" ]; then
  owner=$(stat -c %u "$STATE") mode=$(stat -c %a "$STATE")
  if [ "$owner" != "$(id -u)" ] || [ $(( 8#$mode & 8#022 )) != 0 ]; then
    echo "up.sh: $STATE belongs to uid $owner with mode $mode; it must be this user's ($(id -u)) and writable by" \
      "no one else: remove it or set KNOWLIP_SLURM_STATE to a fresh folder" >&2
    exit 2
  fi
fi
mkdir -p "$STATE"/{etc,munge,munge-key,run,log,spool/ctld,spool/d,spool/d-node1,spool/d-node2}
chmod 755 "$STATE"
STATE=$(cd "$STATE" && pwd)
export SLURM_CONF=$STATE/etc/slurm.conf
SOCKET=$STATE/munge/munge.socket
echo "$NODES" >"$STATE/etc/nodes"

# --- two hosts: namespaces, veth, names ----------------------------------------------------------------------
CTL=()  # how control-plane daemons and clients are run: here, or inside node1's namespace
NET=${KNOWLIP_SLURM_NET:-10.231.0}
NS1=knowlip-node1 NS2=knowlip-node2
if [ "$NODES" = 2 ]; then
  for ns in $NS1 $NS2; do
    [ -e /var/run/netns/$ns ] || ip netns add $ns
  done
  if ! ip -n $NS1 link show knowlip-v1 >/dev/null 2>&1; then
    ip link add knowlip-v1 type veth peer name knowlip-v2
    ip link set knowlip-v1 netns $NS1
    ip link set knowlip-v2 netns $NS2
    ip -n $NS1 addr add "$NET.1/24" dev knowlip-v1
    ip -n $NS2 addr add "$NET.2/24" dev knowlip-v2
  fi
  ip -n $NS1 link set lo up && ip -n $NS1 link set knowlip-v1 up
  ip -n $NS2 link set lo up && ip -n $NS2 link set knowlip-v2 up
  grep -q "# knowlip-local2$" /etc/hosts || printf '%s node1 # knowlip-local2\n%s node2 # knowlip-local2\n' \
    "$NET.1" "$NET.2" >>/etc/hosts
  CTL=(nsenter --net=/var/run/netns/$NS1)
fi

# --- munge ------------------------------------------------------------------------------------------------
if ! alive "$STATE/munge/munged.pid"; then
  KEY=$STATE/munge-key/munge.key  # private; the socket's folder must be open to every user
  rm -f "$KEY" && head -c 1024 /dev/urandom >"$KEY"  # a new key each start: never one found lying there
  chown -R munge:munge "$STATE/munge" "$STATE/munge-key" && chmod 755 "$STATE/munge" && chmod 700 "$STATE/munge-key"
  chmod 400 "$KEY"
  rm -f "$SOCKET"
  runuser -u munge -- munged --key-file="$KEY" --socket="$SOCKET" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/seed"
fi
wait_for 10 munged test -S "$SOCKET"
# Slurm's clients (sacctmgr's connection to slurmdbd at least) ignore AuthInfo=socket and use munge's default
# socket: point it at ours unless another munged already owns it.
if [ ! -S /run/munge/munge.socket.2 ] || [ -L /run/munge/munge.socket.2 ]; then
  mkdir -p /run/munge && ln -sfn "$SOCKET" /run/munge/munge.socket.2
elif [ "$(readlink -f /run/munge/munge.socket.2)" != "$SOCKET" ]; then
  echo "note: /run/munge/munge.socket.2 belongs to another munged; Slurm clients may fail to authenticate"
fi

# --- MariaDB (slurmdbd's store) -------------------------------------------------------------------------
DB_SOCKET=$STATE/run/mariadb.sock
if ! alive "$STATE/run/mariadb.pid"; then
  if [ ! -d "$STATE/mysql/mysql" ]; then
    mariadb-install-db --user=root --datadir="$STATE/mysql" --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1
  fi
  "${CTL[@]}" setsid nohup mariadbd --user=root --datadir="$STATE/mysql" --socket="$DB_SOCKET" --pid-file="$STATE/run/mariadb.pid" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --log-error="$STATE/log/mariadb.log" >/dev/null 2>&1 </dev/null &
fi
wait_for 30 MariaDB mariadb -S "$DB_SOCKET" -u root -e "SELECT 1"
DB_PASS_FILE=$STATE/etc/db.pass  # slurmdbd's database password: new whenever slurmdbd (re)starts
if ! alive "$STATE/run/slurmdbd.pid" || [ ! -s "$DB_PASS_FILE" ]; then
  (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DB_PASS_FILE")
fi
DB_PASS=$(cat "$DB_PASS_FILE")
# on stdin, not the command line: other users see a process's arguments
mariadb -S "$DB_SOCKET" -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL

# --- configs ----------------------------------------------------------------------------------------------
NODE=$(slurmd -C | head -n 1)  # NodeName=... CPUs=... RealMemory=... as slurmd sees this machine
if [ "$NODES" = 2 ]; then  # one CPU and half the memory each
  MEM=$(( $(echo "$NODE" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') / 2 ))
  CTLD_HOST="node1($NET.1)"
  NODE_LINES="NodeName=node1 NodeAddr=$NET.1 NodeHostname=node1 CPUs=1 RealMemory=$MEM State=UNKNOWN
NodeName=node2 NodeAddr=$NET.2 NodeHostname=node2 CPUs=1 RealMemory=$MEM State=UNKNOWN"
  SLURMD_FILES="SlurmdSpoolDir=$STATE/spool/d-%n
SlurmdPidFile=$STATE/run/slurmd.%n.pid
SlurmdLogFile=$STATE/log/slurmd.%n.log"
else
  CTLD_HOST="$HOST(127.0.0.1)"
  NODE_LINES="$NODE State=UNKNOWN"
  SLURMD_FILES="SlurmdSpoolDir=$STATE/spool/d
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmdLogFile=$STATE/log/slurmd.log"
fi
cat >"$STATE/etc/slurm.conf" <<CONF
ClusterName=$CLUSTER
SlurmctldHost=$CTLD_HOST
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
AuthType=auth/munge
AuthInfo=socket=$SOCKET,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/spool/ctld
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
$SLURMD_FILES
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MailProg=/bin/true
JobRequeue=1
EnforcePartLimits=ALL
ReturnToService=2
SchedulerParameters=bf_interval=1,sched_interval=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
$NODE_LINES
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
cat >"$STATE/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$SOCKET
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
CONF
chmod 600 "$STATE/etc/slurmdbd.conf"

# --- Slurm daemons ----------------------------------------------------------------------------------------
alive "$STATE/run/slurmdbd.pid" || "${CTL[@]}" slurmdbd
wait_for 30 slurmdbd "${CTL[@]}" sacctmgr -n list cluster
"${CTL[@]}" sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
"${CTL[@]}" sacctmgr -i -Q add account knowlip Cluster="$CLUSTER" >/dev/null 2>&1 || true
"${CTL[@]}" sacctmgr -i -Q add user "$(id -un)" Account=knowlip DefaultAccount=knowlip >/dev/null 2>&1 || true
if [ "$NODES" = 2 ]; then
  # each daemon in its host's namespace with its own host name (unshare -u), not `ip netns exec` (which
  # remounts /sys: slurmd then finds no cgroup file system)
  alive "$STATE/run/slurmctld.pid" || "${CTL[@]}" unshare -u sh -c 'hostname node1; exec slurmctld -i'
  wait_for 30 slurmctld "${CTL[@]}" scontrol ping
  alive "$STATE/run/slurmd.node1.pid" || nsenter --net=/var/run/netns/$NS1 unshare -u sh -c 'hostname node1; exec slurmd -N node1'
  alive "$STATE/run/slurmd.node2.pid" || nsenter --net=/var/run/netns/$NS2 unshare -u sh -c 'hostname node2; exec slurmd -N node2'
  wait_for 30 "both slurmd (nodes idle)" "${CTL[@]}" sh -c "[ \$(sinfo -h -N -o %T | grep -cE '^(idle|mixed|allocated)') -ge 2 ]"
else
  alive "$STATE/run/slurmctld.pid" || slurmctld -i
  wait_for 30 slurmctld scontrol ping
  alive "$STATE/run/slurmd.pid" || slurmd
  wait_for 30 "slurmd (node idle)" sh -c "sinfo -h -N -o %T | grep -qE '^(idle|mixed|allocated)'"
fi
echo "local Slurm cluster '$CLUSTER' is up ($NODES node$([ "$NODES" = 2 ] && echo s)): state in $STATE"
echo "export SLURM_CONF=$SLURM_CONF"
[ "$NODES" = 2 ] && echo "clients run in node1's namespace: nsenter --net=/var/run/netns/$NS1 CMD"
exit 0
