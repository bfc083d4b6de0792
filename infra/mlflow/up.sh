#!/usr/bin/env bash
# Start an MLflow tracking server on 127.0.0.1 with a SQLite backend store and a local artifact store
# (proxied, so clients need no direct access to it); idempotent.
# Port 5000 unless taken (then a free one, remembered in .infra/mlflow/port). One worker: the default
# (4) costs ~1.3 GB for nothing on a test machine. For many Slurm jobs see docs/infra.md.
# Overrides: DINOV2_MLFLOW_BACKEND_URI (e.g. postgresql://...), DINOV2_MLFLOW_ARTIFACTS (e.g. s3://bucket/mlflow).

source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
require_venv

dir="$INFRA_STATE/mlflow"
port="$(service_port mlflow 5000)"
url="http://127.0.0.1:$port"
mkdir -p "$dir/artifacts"
backend="${DINOV2_MLFLOW_BACKEND_URI:-sqlite:///$dir/mlflow.db}"
artifacts="${DINOV2_MLFLOW_ARTIFACTS:-file://$dir/artifacts}"

# Job execution (huey consumers for GenAI scorers, ~7 processes) is not used by this project.
start_http_service mlflow "$url/health" 120 \
    env -C "$dir" -u MLFLOW_TRACKING_URI MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$VENV_BIN/mlflow" server \
    --backend-store-uri "$backend" --artifacts-destination "$artifacts" \
    --host 127.0.0.1 --port "$port" --workers 1
write_env mlflow \
    "MLFLOW_TRACKING_URI=$url" \
    "DINOV2_TEST_MLFLOW_URI=$url"
