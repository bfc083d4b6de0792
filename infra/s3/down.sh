#!/usr/bin/env bash
# Stop the moto S3 server started by infra/s3/up.sh (its buckets are lost); idempotent.

source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
stop_http_service s3
