#!/usr/bin/env bash
# Stop the Prefect server started by infra/prefect/up.sh (its SQLite database is kept); idempotent.
# A second SIGTERM is sometimes needed by Prefect processes; stop_group escalates to SIGKILL after 20 s.

source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
stop_http_service prefect
