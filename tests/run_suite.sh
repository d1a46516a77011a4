#!/usr/bin/env bash
# `make test`'s pytest step: the suite in three pytest processes side by side.
#
#   1. SLURM-marked tests and the benchmark smoke runs (`-m "slurm or bench"`): the
#      SLURM tests spend most of their wall time waiting on the local cluster;
#   2. the other integration tests, except the raw-scan pipeline;
#   3. unit and reliability tests, and the raw-scan pipeline tests (~5 min: without
#      them group 2 alone set the wall time, 24.7 min vs 10.3 min for this group).
# Why: on 2 cores one pytest leaves a core idle whenever a test is single-threaded or
# waits on SLURM, and CI must finish in 30 minutes. Each group has its own pytest temp
# folder; only group 1 submits SLURM jobs, so the cluster is never shared; no test
# writes outside its tmp_path (benchmark caches are per clone, under bench_out/).
#
# Any argument (e.g. `make test PYTEST_ARGS="-k resume"`) runs one plain pytest
# instead; BRAINAGE_SERIAL_TESTS=1 does the same for the whole suite.
set -uo pipefail
PY="${PY:-.venv/bin/python}"

if [ "$#" -gt 0 ] || [ -n "${BRAINAGE_SERIAL_TESTS:-}" ]; then
    exec "$PY" -m pytest "$@"
fi

base="$(mktemp -d "${TMPDIR:-/tmp}/brainage-tests.XXXXXX")"
names=(slurm-and-bench integration unit-reliability-raw)
raw=tests/integration/test_raw_pipeline.py
args=(
    "-m|slurm or bench"
    "tests/integration|--ignore=$raw|-m|not slurm and not bench"
    "tests/unit|tests/reliability|$raw|-m|not slurm and not bench"
)
pids=()
for i in 0 1 2; do
    IFS='|' read -r -a a <<<"${args[$i]}"
    "$PY" -m pytest "${a[@]}" --basetemp "$base/${names[$i]}" -p no:cacheprovider >"$base/${names[$i]}.log" 2>&1 &
    pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM

summary=""
status=0
for i in 0 1 2; do
    wait "${pids[$i]}"
    rc=$?
    [ "$rc" -eq 5 ] && rc=0  # pytest exit 5: nothing collected (e.g. no SLURM tests selected)
    echo
    echo "==================== tests: ${names[$i]} (exit $rc) ===================="
    cat "$base/${names[$i]}.log"
    summary+=" ${names[$i]}=$rc"
    [ "$rc" -eq 0 ] || status=1
done
echo "make test: exit codes:$summary"
rm -rf "$base"
exit "$status"
