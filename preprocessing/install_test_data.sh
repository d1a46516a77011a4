#!/usr/bin/env bash
# Idempotent install of Debian's mricron-data: a real single-subject head (ch2.nii.gz, Colin 27)
# and its skull-stripped brain (ch2bet.nii.gz) under /usr/share/mricron/templates, used by the
# raw-pipeline tests on real anatomy. Needs root and apt-get, like slurm/local/install.sh.
set -euo pipefail

PKG=mricron-data
if dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -q "install ok installed"; then
    echo "install_test_data.sh: $PKG already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_test_data.sh: need root to install $PKG" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_test_data.sh: apt-get not available; install $PKG manually" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e '^lock$' -e '^partial$' || true)" ]; then
    apt-get update -q
fi
if ! apt-get install -y -q --no-install-recommends "$PKG"; then
    echo "install_test_data.sh: apt-get install failed; retrying after apt-get update" >&2
    apt-get update -q
    apt-get install -y -q --no-install-recommends "$PKG"
fi
echo "install_test_data.sh: done"
