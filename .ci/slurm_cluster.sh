#!/usr/bin/env bash
# A throwaway single-node SLURM cluster (munge + slurmctld + slurmd) for the launcher tests.
#
#   .ci/slurm_cluster.sh start DIR   # config, state, logs and pid files all in DIR
#   export SLURM_CONF=DIR/slurm.conf # what sbatch/srun and the tests read
#   .ci/slurm_cluster.sh stop DIR    # stops the three daemons by the PIDs they wrote
#
# Needs root and Debian's slurmctld slurmd slurm-client munge. Ports are picked free, so it
# can run beside another cluster; job ids restart at 1 with each start.
set -euo pipefail

command=${1:?usage: slurm_cluster.sh start|stop DIR}
dir=${2:?usage: slurm_cluster.sh start|stop DIR}

# A process that exited can linger as a zombie for a moment: `kill -0` still succeeds.
alive() { [ -r "/proc/$1/stat" ] && ! awk '{exit ($3 == "Z") ? 0 : 1}' "/proc/$1/stat"; }

stop() {
  for daemon in slurmd slurmctld munged; do
    [ -s "$dir/$daemon.pid" ] || continue
    pid=$(cat "$dir/$daemon.pid")
    alive "$pid" && kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/$daemon.pid"
  done
}

start() {
  mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
  chmod 700 "$dir/munge"
  mungekey --create --keyfile="$dir/munge/munge.key" --force
  chown -R munge: "$dir/munge" 2>/dev/null || true
  munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/seed" --force

  free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
  local node cpus memory
  node=$(hostname -s)
  cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)
  memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
  # Slightly under what slurmd finds, or the node is drained for "low memory".
  cat >"$dir/slurm.conf" <<EOF
ClusterName=cnnlab
SlurmctldHost=$node
SlurmUser=root
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
# sbatch --wait polls every 2 s while MinJobAge/2 allows it (else every 8 then 32 s).
MinJobAge=4
ReturnToService=2
MailProg=/bin/true
NodeName=$node CPUs=$cpus RealMemory=$((memory * 95 / 100)) State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -i
  slurmd
  for _ in $(seq 100); do
    sinfo -h -o %t 2>/dev/null | grep -qx idle && return 0
    sleep 0.2
  done
  echo "slurm_cluster.sh: the node did not become idle; see $dir/slurmctld.log and slurmd.log" >&2
  return 1
}

case "$command" in
  start) start || { stop; exit 1; } ;;
  stop) stop ;;
  *) echo "usage: slurm_cluster.sh start|stop DIR" >&2; exit 2 ;;
esac
