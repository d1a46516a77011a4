#!/usr/bin/env bash
# `make test`'s pytest step: the SLURM-marked tests run in a second pytest beside the rest.
#
# Why: the SLURM tests spend most of their wall time waiting on the local cluster
# (scheduling, requeue, polling) while the machine's cores sit idle, and the rest
# of the suite needs no cluster; side by side the whole suite takes ~1/3 less wall
# time on 2 cores, which keeps CI inside its budget. Each half has its own pytest
# temp folder; only the SLURM half submits jobs, so the cluster is never shared.
#
# Any argument (e.g. `make test PYTEST_ARGS="-k resume"`) runs one plain pytest
# instead; BRAINAGE_SERIAL_TESTS=1 does the same for the whole suite.
set -uo pipefail
PY="${PY:-.venv/bin/python}"

if [ "$#" -gt 0 ] || [ -n "${BRAINAGE_SERIAL_TESTS:-}" ]; then
    exec "$PY" -m pytest "$@"
fi

base="$(mktemp -d "${TMPDIR:-/tmp}/brainage-tests.XXXXXX")"
slurm_log="$base/slurm.log"
"$PY" -m pytest -m slurm --basetemp "$base/slurm" -p no:cacheprovider >"$slurm_log" 2>&1 &
slurm_pid=$!
trap 'kill "$slurm_pid" 2>/dev/null' INT TERM

"$PY" -m pytest -m "not slurm" --basetemp "$base/rest"
rest_rc=$?
wait "$slurm_pid"
slurm_rc=$?

echo
echo "==================== SLURM-marked tests (ran beside the others) ===================="
cat "$slurm_log"
# pytest exit 5: nothing collected (no SLURM tests selected), not a failure
[ "$slurm_rc" -eq 5 ] && slurm_rc=0
echo "make test: non-SLURM tests exit $rest_rc, SLURM tests exit $slurm_rc"
rm -rf "$base"
[ "$rest_rc" -eq 0 ] && [ "$slurm_rc" -eq 0 ]
