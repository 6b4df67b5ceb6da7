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
set -euo pipefail
STATE=${KNOWLIP_SLURM_STATE:-/tmp/knowlip-slurm}
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

mkdir -p "$STATE"/{etc,munge,munge-key,run,log,spool/ctld,spool/d}
chmod 755 "$STATE"
STATE=$(cd "$STATE" && pwd)
export SLURM_CONF=$STATE/etc/slurm.conf
SOCKET=$STATE/munge/munge.socket

# --- munge ------------------------------------------------------------------------------------------------
if ! alive "$STATE/munge/munged.pid"; then
  KEY=$STATE/munge-key/munge.key  # private; the socket's folder must be open to every user
  [ -f "$KEY" ] || head -c 1024 /dev/urandom >"$KEY"
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
  setsid nohup mariadbd --user=root --datadir="$STATE/mysql" --socket="$DB_SOCKET" --pid-file="$STATE/run/mariadb.pid" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --log-error="$STATE/log/mariadb.log" >/dev/null 2>&1 </dev/null &
fi
wait_for 30 MariaDB mariadb -S "$DB_SOCKET" -u root -e "SELECT 1"
mariadb -S "$DB_SOCKET" -u root -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'knowlip';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

# --- configs ----------------------------------------------------------------------------------------------
NODE=$(slurmd -C | head -n 1)  # NodeName=... CPUs=... RealMemory=... as slurmd sees this machine
cat >"$STATE/etc/slurm.conf" <<CONF
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
AuthType=auth/munge
AuthInfo=socket=$SOCKET,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
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
$NODE State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
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
StoragePass=knowlip
StorageLoc=slurm_acct_db
CONF
chmod 600 "$STATE/etc/slurmdbd.conf"

# --- Slurm daemons ----------------------------------------------------------------------------------------
alive "$STATE/run/slurmdbd.pid" || slurmdbd
wait_for 30 slurmdbd sacctmgr -n list cluster
sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
sacctmgr -i -Q add account knowlip Cluster="$CLUSTER" >/dev/null 2>&1 || true
sacctmgr -i -Q add user "$(id -un)" Account=knowlip DefaultAccount=knowlip >/dev/null 2>&1 || true
alive "$STATE/run/slurmctld.pid" || slurmctld -i
wait_for 30 slurmctld scontrol ping
alive "$STATE/run/slurmd.pid" || slurmd
wait_for 30 "slurmd (node idle)" sh -c "sinfo -h -N -o %T | grep -qE '^(idle|mixed|allocated)'"
echo "local Slurm cluster '$CLUSTER' is up: state in $STATE"
echo "export SLURM_CONF=$SLURM_CONF"
