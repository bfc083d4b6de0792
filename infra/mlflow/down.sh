#!/usr/bin/env bash
# Stop the MLflow server started by infra/mlflow/up.sh (database and artifacts are kept); idempotent.

source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
stop_http_service mlflow
