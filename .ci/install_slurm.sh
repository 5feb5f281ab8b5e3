#!/usr/bin/env bash
# Install a single-node Slurm (slurm-wlm + munge) and shellcheck for the Slurm tests.
#
# Idempotent and quiet: does nothing when the binaries are already there. Never fails the
# CI run: without root, apt-get or network it prints why and exits 0, and the Slurm tests
# then skip with a clear reason.
set -u

need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
command -v munged >/dev/null 2>&1 || need+=(munge)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)

if [ "${#need[@]}" -eq 0 ]; then
    echo "install_slurm: slurm, munge and shellcheck already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: no apt-get; not installing ${need[*]} (Slurm tests will skip)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm: not root; not installing ${need[*]} (Slurm tests will skip)"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
echo "install_slurm: installing ${need[*]}"
if ! apt-get update -qq >/dev/null 2>&1; then
    echo "install_slurm: apt-get update failed (no network?); Slurm tests will skip"
    exit 0
fi
if ! apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1; then
    echo "install_slurm: apt-get install ${need[*]} failed; Slurm tests will skip"
    exit 0
fi
# The packages may start system daemons; the tests run their own from a private config.
for unit in slurmctld slurmd munge; do
    if command -v service >/dev/null 2>&1; then
        service "$unit" stop >/dev/null 2>&1 || true
    fi
done
echo "install_slurm: done"
exit 0
