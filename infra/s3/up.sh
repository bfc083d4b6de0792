#!/usr/bin/env bash
# Start an S3-compatible server (moto) on 127.0.0.1 for tests and local runs; idempotent.
# Port 9000 unless taken (then a free one, remembered in .infra/s3/port). Data lives in memory:
# a restart empties every bucket.

source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
require_venv

port="$(service_port s3 9000)"
url="http://127.0.0.1:$port"
start_http_service s3 "$url/moto-api/" 30 "$VENV_BIN/moto_server" -H 127.0.0.1 -p "$port"
# Any credentials work with moto, but s3fs/boto refuse to run without some.
write_env s3 \
    "AWS_ENDPOINT_URL=$url" \
    "AWS_ACCESS_KEY_ID=testing" \
    "AWS_SECRET_ACCESS_KEY=testing" \
    "AWS_DEFAULT_REGION=us-east-1" \
    "DINOV2_TEST_S3_ENDPOINT=$url"
