#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for CI: partitions `cpu` (default) and `h100`, four GPUs
# faked as typed GRES (gpu:h100:4 backed by /dev/null, so jobs get CUDA_VISIBLE_DEVICES but no device).
#
#   bash .ci/slurm/cluster.sh up   STATE_DIR    install (apt) if needed, write /etc/slurm, start munged,
#                                               slurmctld and slurmd; returns when the node is idle
#   bash .ci/slurm/cluster.sh down STATE_DIR    stop the daemons by PID
#
# Every wait is bounded. The node declares the resources of a real H100 node (SlurmdParameters=
# config_overrides), so the users' profile (profiles/slurm) is submitted unchanged; nothing is enforced (no
# cgroups), and CI keeps torch's threads low with --set-threads. Settings and why: ../shared/SLURM_CI.md.
set -euo pipefail

cmd=${1:?usage: cluster.sh up|down STATE_DIR}
state=$(realpath -m "${2:?usage: cluster.sh up|down STATE_DIR}")

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll every 0.5 s, fail with the logs when it never holds
  local limit=$1 what=$2
  shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= end)); then
      echo "cluster.sh: $what did not happen within ${limit}s" >&2
      tail -n 30 "$state"/*.log >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

node_idle() { [ "$(sinfo -h -n localhost -o %T 2>/dev/null | head -1)" = idle ]; }

down() {
  for daemon in slurmd slurmctld munged; do
    local pidfile="$state/$daemon.pid"
    [ -s "$pidfile" ] || continue
    local pid
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  echo "cluster.sh: stopped"
}

up() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "cluster.sh: installing slurm-wlm and munge (Debian packages)"
    timeout 600 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  fi
  # A fresh state per run: stale state keeps old drains and jobs.
  rm -rf "$state"
  mkdir -p "$state"/{ctld,spool,munge,gpus}
  chmod 755 "$state"   # munge's socket directory must be reachable by every user
  chmod 700 "$state/munge"

  # munge: a key of our own, socket and pid in the state directory
  dd if=/dev/urandom bs=1 count=1024 of="$state/munge/munge.key" status=none
  chmod 400 "$state/munge/munge.key"
  mkdir -p /run/munge && chmod 755 /run/munge
  munged --force --key-file="$state/munge/munge.key" --socket=/run/munge/munge.socket.2 \
    --pid-file="$state/munged.pid" --log-file="$state/munged.log" --seed-file="$state/munge/seed"
  wait_for 20 "munged start" test -S /run/munge/munge.socket.2

  for i in 0 1 2 3; do ln -sf /dev/null "$state/gpus/nvidia$i"; done
  # The jobstep plugin clears SLURM_CONF before its inner srun: the config must be at the default path.
  mkdir -p /etc/slurm
  cat >/etc/slurm/slurm.conf <<EOF
ClusterName=kdflow-ci
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# no cgroups, no accounting daemon, no mail
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# finished jobs stay visible to squeue (the status command without sacct, and the test's checks) for an hour
MinJobAge=3600
ReturnToService=2
KillWait=10
GresTypes=gpu
# declare an H100 node's resources whatever this machine has, so the users' profile is submitted as it is
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=64 Boards=1 SocketsPerBoard=1 CoresPerSocket=64 ThreadsPerCore=1 RealMemory=1000000 Gres=gpu:h100:4 State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=h100 Nodes=localhost MaxTime=INFINITE State=UP
EOF
  cat >/etc/slurm/gres.conf <<EOF
AutoDetect=off
NodeName=localhost Name=gpu Type=h100 File=$state/gpus/nvidia[0-3]
EOF
  slurmctld -i
  wait_for 30 "slurmctld answering" scontrol ping
  slurmd -N localhost
  wait_for 60 "node localhost idle" node_idle
  sinfo -o "%P %a %D %T %c %m %G"
  echo "cluster.sh: up (state in $state)"
}

case $cmd in
  up) up ;;
  down) down ;;
  *) echo "usage: cluster.sh up|down STATE_DIR" >&2; exit 2 ;;
esac
