#!/usr/bin/env bash
# Idempotent install of the Debian packages for the local SLURM test cluster.
# Needs root and apt-get; does nothing if everything is already installed.
set -euo pipefail

PKGS=(slurmctld slurmd slurm-client munge)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install.sh: SLURM packages already installed (${PKGS[*]})"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: need root to install: ${missing[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: apt-get not available; install manually: ${missing[*]}" >&2
    exit 1
fi

echo "install.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists if they are missing (fresh containers ship without them).
if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e '^lock$' -e '^partial$' || true)" ]; then
    apt-get update -q
fi
if ! apt-get install -y -q --no-install-recommends "${PKGS[@]}"; then
    echo "install.sh: apt-get install failed; retrying after apt-get update" >&2
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${PKGS[@]}"
fi
echo "install.sh: done"
