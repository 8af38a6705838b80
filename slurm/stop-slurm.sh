#!/usr/bin/env bash
# stop-slurm.sh - stop the daemons that start-slurm.sh started, by their PID files only.
# dmvae-prior-bench: stops the cluster of slurm/start-slurm.sh (same SLURM_TEST_BASE).
# Usage: stop-slurm.sh [--purge]   (--purge also deletes state, spool, DB and logs)
set -uo pipefail
BASE=${SLURM_TEST_BASE:-/tmp/dmvae-slurm}
RUN=$BASE/run
log() { echo "[stop-slurm] $*"; }
# is_live PID NAME: process exists, is not a zombie (PID 1 here reaps orphans late) and is NAME
is_live() {
  local p=${1:-} st
  [ -n "$p" ] && [ "$(cat /proc/"$p"/comm 2>/dev/null)" = "$2" ] || return 1
  st=$(sed 's/^.*) //' /proc/"$p"/stat 2>/dev/null | cut -d' ' -f1)
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# Cancel this cluster's jobs first, so their slurmstepd processes end cleanly.
# %F = array master id (plain id for non-array jobs): cancels pending array tasks too.
if [ -s "$RUN/slurmctld.pid" ] && is_live "$(cat "$RUN/slurmctld.pid")" slurmctld \
   && [ -n "$(squeue -h -o %F 2>/dev/null)" ]; then
  log "cancelling jobs: $(squeue -h -r -o %F | sort -u | tr '\n' ' ')"
  for _ in $(seq 1 60); do
    squeue -h -r -o %F 2>/dev/null | sort -u | xargs -r scancel --full 2>/dev/null
    [ -z "$(squeue -h -o %F 2>/dev/null)" ] && break; sleep 0.5
  done
  # last resort: kill leftover job-step processes by PID (needs slurmd still up)
  if [ -n "$(squeue -h -o %F 2>/dev/null)" ]; then
    pids=$(scontrol listpids 2>/dev/null | awk 'NR>1 && $1 ~ /^[0-9]+$/ {print $1}')
    [ -n "$pids" ] && { log "killing leftover job pids: $pids"; kill -KILL $pids 2>/dev/null; }
  fi
fi

# stop NAME PIDFILE: TERM, wait up to 15 s, then KILL; only if the pid is a live NAME
stop() {
  local name=$1 pf=$2 pid
  [ -s "$pf" ] || return 0
  pid=$(cat "$pf")
  if ! is_live "$pid" "$name"; then
    log "$name: pid $pid not running (or reused); removing stale $pf"; rm -f "$pf"; return 0
  fi
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 60); do is_live "$pid" "$name" || break; sleep 0.25; done
  if is_live "$pid" "$name"; then log "$name did not exit, SIGKILL"; kill -KILL "$pid" 2>/dev/null; fi
  rm -f "$pf"
}
stop slurmd    "$RUN/slurmd.pid"
# remove the (empty) cgroup v1 dirs slurmd creates when SLURM_CGROUP=yes
for d in /sys/fs/cgroup/*/slurm_localhost; do
  [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
done
stop slurmctld "$RUN/slurmctld.pid"
stop slurmdbd  "$RUN/slurmdbd.pid"
stop mariadbd  "$RUN/mariadbd.pid"
stop munged    "$RUN/munged.pid"      # exists only if start-slurm.sh started munged

if [ "${1:-}" = --purge ]; then
  log "purging $BASE/{state,spool,mysql,log,run}"
  rm -rf "$BASE/state" "$BASE/spool" "$BASE/mysql" "$BASE/log" "$RUN"
fi
exit 0
