#!/usr/bin/env bash
# Stop the local SLURM cluster started by slurm/local/start.sh (idempotent).
#
#   bash slurm/local/stop.sh            # cancel jobs, stop slurmd x4, slurmctld, munged (if ours)
#   bash slurm/local/stop.sh --purge    # ... and delete the state folder and /etc/slurm/slurm.conf link
#
# Only processes named in the pid files under $SLURM_LOCAL_STATE/run are
# stopped; a munged that start.sh found already running is left alone.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${SLURM_LOCAL_STATE:-$HERE/state}"
PURGE=0
[ "${1:-}" = "--purge" ] && PURGE=1

if [ ! -d "$STATE" ]; then
    echo "stop.sh: nothing to stop ($STATE does not exist)"
    exit 0
fi
STATE="$(cd "$STATE" && pwd)"
export SLURM_CONF="$STATE/slurm.conf"

pid_of() {   # pid_of PIDFILE COMM -> prints pid if alive and named COMM
    local pf="$1" comm="$2" pid
    [ -s "$pf" ] || return 1
    pid="$(tr -dc '0-9' <"$pf")"
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || return 1
    alive "$pid" || return 1
    echo "$pid"
}

alive() {   # a zombie (PID 1 in containers may not reap quickly) counts as gone
    [ -d "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != "Z" ]
}

stop_pidfiles() {   # stop_pidfiles COMM PIDFILE...: SIGTERM all, wait (10 s), then SIGKILL
    local comm="$1" pf pid pids=() _
    shift
    for pf in "$@"; do
        if pid="$(pid_of "$pf" "$comm")"; then
            echo "stop.sh: stopping $comm (pid $pid, $(basename "$pf"))"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 1 100); do
            alive "$pid" || break
            sleep 0.1
        done
        if alive "$pid"; then
            echo "stop.sh: $comm (pid $pid) ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$@"
}

# Cancel remaining jobs first so no slurmstepd outlives its slurmd.
if [ -f "$SLURM_CONF" ] && pid_of "$STATE/run/slurmctld.pid" slurmctld >/dev/null; then
    jobs="$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
    if [ -n "${jobs// /}" ]; then
        echo "stop.sh: cancelling jobs $jobs"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        for _ in $(seq 1 50); do
            [ -z "$(timeout 5 squeue -h -t R,CG -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
fi

shopt -s nullglob
stop_pidfiles slurmd "$STATE"/run/slurmd-*.pid
stop_pidfiles slurmctld "$STATE/run/slurmctld.pid"

if [ -e "$STATE/run/munged.ours" ] && [ "${SLURM_LOCAL_KEEP_MUNGE:-0}" != 1 ]; then
    stop_pidfiles munged /run/munge/munged.pid
    rm -f "$STATE/run/munged.ours"
fi

if [ "$PURGE" -eq 1 ]; then
    if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$STATE/slurm.conf" ]; then
        rm -f /etc/slurm/slurm.conf
    fi
    rm -rf "$STATE"
    echo "stop.sh: purged $STATE"
fi
echo "stop.sh: local SLURM cluster stopped"
