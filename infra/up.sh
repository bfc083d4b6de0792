#!/usr/bin/env bash
# Start the local services (Slurm cluster, moto S3, Prefect server, MLflow server) in parallel and
# write their client variables to .infra/env.sh. Idempotent.
#
# Usage: infra/up.sh [SERVICE...]     SERVICE in: slurm s3 prefect mlflow (default: all)
# Then:  source .infra/env.sh

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ALL_SERVICES=(slurm s3 prefect mlflow)
services=("$@")
((${#services[@]})) || services=("${ALL_SERVICES[@]}")
for service in "${services[@]}"; do
    [[ " ${ALL_SERVICES[*]} " == *" $service "* ]] ||
        die "unknown service '$service' (allowed: ${ALL_SERVICES[*]})"
done

start=$SECONDS
declare -A pids
for service in "${services[@]}"; do
    bash "$INFRA_DIR/$service/up.sh" &
    pids[$service]=$!
done
failed=()
for service in "${services[@]}"; do
    wait "${pids[$service]}" || failed+=("$service")
done
if ((${#failed[@]})); then
    die "failed to start: ${failed[*]} (logs under $INFRA_STATE/<service>/)"
fi
log "services up in $((SECONDS - start)) s: ${services[*]}; client variables: source $INFRA_STATE/env.sh"
