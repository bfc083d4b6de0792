#!/usr/bin/env bash
# Stop the local Slurm cluster started by infra/slurm/up.sh: cancel its jobs, then stop slurmd,
# slurmctld, slurmdbd, MariaDB and (only if up.sh started it) munged. Idempotent.
#
# Usage: infra/slurm/down.sh [--purge]
#   --purge  also delete the cluster's state (job ids, accounting database, logs)

source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

S="$INFRA_STATE/slurm"
export SLURM_CONF="$S/etc/slurm.conf"
export PATH="$PATH:/usr/sbin"

purge=0
for arg in "$@"; do
    case "$arg" in
        --purge) purge=1 ;;
        *) die "unknown argument '$arg' (allowed: --purge)" ;;
    esac
done

no_jobs_left() { [[ -z "$(squeue -h -o %i 2>/dev/null)" ]]; }

if pidfile_alive "$S/run/slurmctld.pid.ours"; then
    jobs="$(squeue -h -o %i 2>/dev/null || true)"
    if [[ -n "$jobs" ]]; then
        log "cancelling jobs: $(echo $jobs)"
        scancel $jobs 2>/dev/null || true
        # Give slurmd time to kill the job steps (KillWait=5) so no job outlives the cluster.
        wait_until 15 "jobs to finish" no_jobs_left || true
    fi
fi

stop_pidfile slurmd "$S/run/slurmd.pid.ours"
stop_pidfile slurmctld "$S/run/slurmctld.pid.ours"
stop_pidfile slurmdbd "$S/run/slurmdbd.pid.ours"
stop_pidfile mariadbd "$S/run/mariadbd.pid"
# munged is machine-wide: another Slurm cluster (e.g. a second checkout's) may still need it.
other_slurm_daemons() { ps -C slurmctld,slurmd,slurmdbd -o stat= 2>/dev/null | grep -qv '^ *Z'; }
if [[ -s "$S/run/munged.pid" ]] && other_slurm_daemons; then
    log "leaving munged running: other Slurm daemons on this machine use it"
else
    stop_pidfile munged "$S/run/munged.pid"
fi
remove_env slurm

if ((purge)) && [[ -d "$S" ]]; then
    log "deleting $S"
    rm -rf "$S"
fi
log "slurm cluster stopped"
