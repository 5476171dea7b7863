#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the wove-executor-slurm tests (idempotent).
#
#   wove-executor-slurm/tests/start_slurm.sh [start|stop|status] [DIR]
#
# start (the default): installs Debian's slurm-wlm and munge when sbatch/slurmctld/slurmd/munged
# are missing (needs root and apt-get), writes DIR/slurm.conf for this host (one node,
# one partition "wove", linuxproc process tracking, no cgroups, no accounting), starts munged,
# slurmctld and slurmd with their state, logs and sockets under DIR (default
# ${WOVE_SLURM_DIR:-/tmp/wove-slurm}), waits until the node is idle, and prints
#   SLURM_CONF=DIR/slurm.conf
# Already running: it only checks and prints that line (quick). Clients need SLURM_CONF
# in their environment (the tests set it). stop: stops the three daemons. status: exit 0
# when the cluster answers.
set -euo pipefail

action="${1:-start}"
DIR="${2:-${WOVE_SLURM_DIR:-/tmp/wove-slurm}}"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"
MUNGE_SOCKET="$DIR/munge/munge.socket.2"
HOST="$(hostname -s)"
# Ports of their own, so a cluster the machine may already run is not disturbed.
CTLD_PORT="${WOVE_SLURM_CTLD_PORT:-16817}"
SLURMD_PORT="${WOVE_SLURM_SLURMD_PORT:-16818}"
# Job slots: the node claims this many CPUs (SlurmdParameters=config_overrides), so many
# short single-CPU jobs run at once on a small machine.
SLOTS="${WOVE_SLURM_SLOTS:-64}"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

answers() { scontrol ping 2>/dev/null | grep -q "is UP"; }

stop() {
  for name in slurmd slurmctld munged; do
    pidfile="$DIR/$name.pid"
    [ "$name" = munged ] && pidfile="$DIR/munge/munged.pid"
    if alive "$pidfile"; then
      kill "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true
      for _ in $(seq 1 50); do alive "$pidfile" || break; sleep 0.1; done
      alive "$pidfile" && kill -9 "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true
    fi
  done
}

case "$action" in
  stop) [ -d "$DIR" ] && stop; exit 0 ;;
  status) answers; exit $? ;;
  start) ;;
  *) echo "usage: $0 [start|stop|status] [DIR]" >&2; exit 2 ;;
esac

if ! command -v sbatch >/dev/null || ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v munged >/dev/null; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "start_slurm.sh: Slurm is not installed and this is not root on Debian/Ubuntu; install slurm-wlm and munge" >&2
    exit 3
  fi
  echo "start_slurm.sh: installing slurm-wlm and munge" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null \
    || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; }
fi

if [ -f "$CONF" ] && alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && answers; then
  echo "SLURM_CONF=$CONF"
  exit 0
fi
stop 2>/dev/null || true

mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
chmod 0755 "$DIR"
chmod 0700 "$DIR/munge"
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chmod 0400 /etc/munge/munge.key
fi
memory=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)
cat > "$CONF" <<CONF
# written by wove-executor-slurm/tests/start_slurm.sh
ClusterName=wove
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$SLOTS RealMemory=$memory State=UNKNOWN
PartitionName=wove Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

munged --force --socket="$MUNGE_SOCKET" --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
  --seed-file="$DIR/munge/munged.seed"
slurmctld -c -f "$CONF"   # -c: a clean state (no jobs of an earlier run)
slurmd -f "$CONF"

for _ in $(seq 1 150); do
  if answers && sinfo -h -o "%t" 2>/dev/null | grep -qE "^idle"; then
    echo "SLURM_CONF=$CONF"
    exit 0
  fi
  sleep 0.2
done
echo "start_slurm.sh: the cluster did not come up; logs:" >&2
tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" "$DIR/munge/munged.log" >&2 2>/dev/null || true
exit 4
