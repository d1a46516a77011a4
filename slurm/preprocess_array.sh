#!/bin/bash
# Preprocess an HCP S1200 download as a SLURM job array, then merge and verify.
#
#   HCP_ROOT=/data/HCP_1200 OUT=/scratch/$USER/shards bash slurm/preprocess_array.sh
#   HCP_ROOT=... OUT=... PREPROCESS_ARGS="--shape 160 192 160 --compression lzf" bash slurm/preprocess_array.sh
#   COHORTS="ixi=bids:/data/IXI clinic=csv:/data/scans.csv" OUT=... PREPROCESS_ARGS="--pipeline raw" bash slurm/preprocess_array.sh
#
# Run it with bash (not sbatch) from the repository root on a login node. It submits
#   1. a plan job: discovers subjects, makes the splits (and fits histogram
#      landmarks with --intensity histogram) once, into $OUT/plan.json;
#   2. an array of ceil(subject folders / SHARD_SIZE) tasks after it; task i writes
#      shard i (SLURM_ARRAY_TASK_ID selects it), so no two tasks touch one file;
#   3. a merge job after all tasks succeed: manifest.json, failures.csv, then
#      `brainage verify`.
# Submitting the same command again after a failure or a time-out redoes only the
# shards that are missing or damaged (finished ones are skipped by checksum).
#
# Environment (default):
#   HCP_ROOT          HCP root with <subject>/T1w/T1w_acpc_dc_restore_brain.nii.gz and the CSVs
#   COHORTS           other cohorts, space-separated [NAME=][KIND:]PATH (BIDS roots, CSV tables);
#                     HCP_ROOT, COHORTS or both are required
#   OUT               output folder on a file system every node sees (required)
#   SHARD_SIZE        subjects per shard = per array task (32)
#   CPUS              CPUs per array task = preprocess --workers (4)
#   MAX_PARALLEL      array tasks running at once (50)
#   TIME              minutes per job (60)
#   PARTITION         partition (cluster default)
#   PREPROCESS_ARGS   extra `brainage preprocess` options, passed to every job, e.g.
#                     "--restricted /secure/RESTRICTED_x.csv --voxel-mm 1.0 --max-fail-fraction 0.05"
#   VENV              python environment with brainage-hpc (BRAINAGE_HOME/.venv)
#   BRAINAGE_HOME     repository checkout (current folder)
#   DRY_RUN=1         print the sbatch commands instead of submitting
set -euo pipefail

HCP_ROOT="${HCP_ROOT:-}"
COHORTS="${COHORTS:-}"
[ -n "$HCP_ROOT$COHORTS" ] || { echo "preprocess_array.sh: error: set HCP_ROOT (HCP download) and/or COHORTS (BIDS roots, CSV tables)" >&2; exit 2; }
: "${OUT:?set OUT to the output folder for the shards}"
REPO="${BRAINAGE_HOME:-$PWD}"
VENV="${VENV:-$REPO/.venv}"
SHARD_SIZE="${SHARD_SIZE:-32}"
CPUS="${CPUS:-4}"
MAX_PARALLEL="${MAX_PARALLEL:-50}"
TIME="${TIME:-60}"
PREPROCESS_ARGS="${PREPROCESS_ARGS:-}"

[ -z "$HCP_ROOT" ] || [ -d "$HCP_ROOT" ] || { echo "preprocess_array.sh: error: HCP_ROOT=$HCP_ROOT is not a directory" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || { echo "preprocess_array.sh: error: no python in VENV=$VENV (make venv, or set VENV)" >&2; exit 2; }
mkdir -p "$OUT/logs"

BRAINAGE=("$VENV/bin/python" -u -m brainage_hpc.cli)
SOURCES=()
[ -n "$HCP_ROOT" ] && SOURCES+=(--hcp-root "$HCP_ROOT")
for c in $COHORTS; do SOURCES+=(--cohort "$c"); done
COMMON=("${SOURCES[@]}" --out "$OUT" --shard-size "$SHARD_SIZE" --no-progress)

if [ -z "$COHORTS" ]; then
    # Upper bound on the shard count: every folder with a T1w/ folder (bad subjects only make it smaller).
    N_FOLDERS=$(find "$HCP_ROOT" -mindepth 2 -maxdepth 2 -type d -name T1w | wc -l)
    [ "$N_FOLDERS" -gt 0 ] || { echo "preprocess_array.sh: error: no <subject>/T1w folders in $HCP_ROOT" >&2; exit 2; }
    N_TASKS=$(( (N_FOLDERS + SHARD_SIZE - 1) / SHARD_SIZE ))
else
    # exact count from the cohorts' tables and file names (no image is read)
    # shellcheck disable=SC2086
    N_SHARDS=$("${BRAINAGE[@]}" preprocess "${COMMON[@]}" --count-shards $PREPROCESS_ARGS 2>/dev/null | tail -n 1) || true
    [[ "$N_SHARDS" =~ ^[0-9]+$ ]] && [ "$N_SHARDS" -gt 0 ] || {
        echo "preprocess_array.sh: error: cannot read the cohorts; run: brainage preprocess ${COMMON[*]} --count-shards" >&2; exit 2; }
    N_TASKS=$N_SHARDS
fi

SBATCH=(sbatch --parsable --time="$TIME" --chdir="$REPO" --export=ALL,OMP_NUM_THREADS=1)
[ -n "${PARTITION:-}" ] && SBATCH+=(--partition="$PARTITION")

submit() {  # submit NAME SBATCH_OPTIONS... -- COMMAND...
    local name="$1"; shift
    local opts=()
    while [ "$1" != "--" ]; do opts+=("$1"); shift; done
    shift
    local wrap
    wrap="$(printf '%q ' "$@")"
    if [ -n "${DRY_RUN:-}" ]; then
        echo "${SBATCH[*]} --job-name=$name ${opts[*]} --wrap=\"$wrap\"" >&2
        echo "DRY$RANDOM"
    else
        "${SBATCH[@]}" --job-name="$name" "${opts[@]}" --wrap="$wrap"
    fi
}

# shellcheck disable=SC2086  # PREPROCESS_ARGS is a list of options on purpose
PLAN=$(submit brainage-plan --cpus-per-task="$CPUS" --output="$OUT/logs/plan-%j.out" -- \
    "${BRAINAGE[@]}" preprocess "${COMMON[@]}" --workers "$CPUS" --plan-only $PREPROCESS_ARGS)
# shellcheck disable=SC2086
ARRAY=$(submit brainage-preprocess --array="0-$((N_TASKS - 1))%$MAX_PARALLEL" --cpus-per-task="$CPUS" \
    --dependency="afterok:$PLAN" --output="$OUT/logs/shard-%a-%A.out" -- \
    "${BRAINAGE[@]}" preprocess "${COMMON[@]}" --workers "$CPUS" $PREPROCESS_ARGS)
# the merge job runs `preprocess --merge` and then `verify`: two commands, so a bash -c wrapper
MERGE_CMD="$(printf '%q ' "${BRAINAGE[@]}" preprocess --merge --out "$OUT") $PREPROCESS_ARGS && $(printf '%q ' "${BRAINAGE[@]}" verify "$OUT" --no-progress)"
MERGE=$(submit brainage-merge --cpus-per-task=1 --dependency="afterok:$ARRAY" --output="$OUT/logs/merge-%j.out" -- \
    bash -c "$MERGE_CMD")

echo "submitted: plan $PLAN -> array $ARRAY (0-$((N_TASKS - 1)), $SHARD_SIZE subjects each) -> merge+verify $MERGE"
echo "logs: $OUT/logs/; result: $OUT/manifest.json (rerun this command to redo failed or missing shards)"
