#!/usr/bin/env bash
# The newcomer's main job in one command: set up the Python environment (no system packages, no
# services) and run the end-to-end pipeline on the embedded default — local launcher, Prefect's
# ephemeral API, MLflow on SQLite, local files — on a small built-in generated image set.
#
# Usage: bash infra/demo.sh [demo options]     e.g. --source /path/to/images  or  --source s3://bucket/prefix
# Everything the demo writes goes under ./dinov2-demo (override with --work-dir).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/infra/setup.sh"
exec "${DINOV2_VENV:-$repo/.venv}/bin/dinov2-pipeline" demo "$@"
