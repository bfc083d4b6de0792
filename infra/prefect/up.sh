#!/usr/bin/env bash
# Start a Prefect 3 server on 127.0.0.1 (API + UI + scheduler services); idempotent.
# Port 4200 unless taken (then a free one, remembered in .infra/prefect/port).
# Database: SQLite in .infra/prefect/home (PREFECT_HOME). For a shared or production server set
# DINOV2_PREFECT_DATABASE_URL=postgresql+asyncpg://user:pass@host:5432/prefect before starting
# (PostgreSQL >= 14.9 with the pg_trgm extension; see docs/infra.md). The URL is never printed.

source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
require_venv

dir="$INFRA_STATE/prefect"
port="$(service_port prefect 4200)"
api_url="http://127.0.0.1:$port/api"
mkdir -p "$dir/home"

server_env=(
    -u PREFECT_API_URL -u PREFECT_API_KEY -u PREFECT_PROFILE
    "PREFECT_HOME=$dir/home"
    "PREFECT_SERVER_ANALYTICS_ENABLED=false"
    "PREFECT_SERVER_API_HOST=127.0.0.1"
    "PREFECT_SERVER_API_PORT=$port"
    "PREFECT_UI_API_URL=$api_url"
)
if [[ -n "${DINOV2_PREFECT_DATABASE_URL:-}" ]]; then
    server_env+=("PREFECT_SERVER_DATABASE_CONNECTION_URL=$DINOV2_PREFECT_DATABASE_URL")
    log "prefect: using the database from DINOV2_PREFECT_DATABASE_URL"
fi
# Run from the state directory: Prefect also reads settings from a .env file in the working directory.
start_http_service prefect "$api_url/health" 120 \
    env -C "$dir" "${server_env[@]}" "$VENV_BIN/prefect" server start --host 127.0.0.1 --port "$port"
write_env prefect \
    "PREFECT_API_URL=$api_url" \
    "PREFECT_SERVER_ANALYTICS_ENABLED=false" \
    "DINOV2_TEST_PREFECT_API_URL=$api_url"
