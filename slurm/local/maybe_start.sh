#!/usr/bin/env bash
# Called by `make test` before pytest: bring up the local SLURM cluster when we can.
#
# * root (or passwordless sudo) and (SLURM installed or apt-get available):
#   run install.sh + start.sh.
# * otherwise, or if that fails: print "SLURM tests will be skipped: <reason>"
#   and exit 0, so `make test` still runs everything else.
# * CI=true (or BRAINAGE_REQUIRE_SLURM=1): any failure exits non-zero; CI must
#   always run the SLURM tests.
# Set SLURM_LOCAL=0 to never touch SLURM from `make test`.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

required=0
[ "${CI:-}" = "true" ] && required=1
case "${BRAINAGE_REQUIRE_SLURM:-}" in 1|true|yes) required=1 ;; esac

skip() {
    if [ "$required" -eq 1 ]; then
        echo "maybe_start.sh: ERROR: SLURM is required here (CI) but: $1" >&2
        exit 1
    fi
    echo "*** SLURM tests will be skipped: $1 ***"
    exit 0
}

if [ "${SLURM_LOCAL:-1}" = "0" ] && [ "$required" -eq 0 ]; then
    skip "SLURM_LOCAL=0"
fi

# How to get root.
if [ "$(id -u)" -eq 0 ]; then
    AS_ROOT=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    AS_ROOT=(sudo -n --preserve-env=SLURM_LOCAL_STATE,SLURM_LOCAL_MEM_MB,SLURM_LOCAL_WAIT_S)
else
    skip "not root (and no passwordless sudo); the local cluster needs root (make slurm-up as root)"
fi

have_slurm=1
for b in munged slurmctld slurmd sinfo; do
    command -v "$b" >/dev/null 2>&1 || have_slurm=0
done
# sbin is not always on a non-root PATH
[ "$have_slurm" -eq 0 ] && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/munged ] && command -v sinfo >/dev/null 2>&1 && have_slurm=1

if [ "$have_slurm" -eq 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        skip "SLURM not installed and no apt-get to install it (see slurm/local/README.md)"
    fi
    if ! "${AS_ROOT[@]}" bash "$HERE/install.sh"; then
        skip "installing the SLURM packages failed (slurm/local/install.sh)"
    fi
fi

if ! "${AS_ROOT[@]}" bash "$HERE/start.sh"; then
    skip "the local cluster did not start (slurm/local/start.sh; logs in slurm/local/state/log)"
fi
exit 0
