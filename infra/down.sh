#!/usr/bin/env bash
# Stop the local services started by infra/up.sh. Idempotent; stops every service even if one fails.
#
# Usage: infra/down.sh [--purge] [SERVICE...]   SERVICE in: slurm s3 prefect mlflow (default: all)
#   --purge  also delete the Slurm cluster's state (job ids, accounting database)

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ALL_SERVICES=(slurm s3 prefect mlflow)
slurm_args=()
services=()
for arg in "$@"; do
    case "$arg" in
        --purge) slurm_args+=(--purge) ;;
        *)
            [[ " ${ALL_SERVICES[*]} " == *" $arg "* ]] ||
                die "unknown argument '$arg' (allowed: --purge ${ALL_SERVICES[*]})"
            services+=("$arg")
            ;;
    esac
done
((${#services[@]})) || services=("${ALL_SERVICES[@]}")

status=0
for service in "${services[@]}"; do
    if [[ "$service" == slurm ]]; then
        bash "$INFRA_DIR/slurm/down.sh" "${slurm_args[@]}" || status=1
    else
        bash "$INFRA_DIR/$service/down.sh" || status=1
    fi
done
exit "$status"
