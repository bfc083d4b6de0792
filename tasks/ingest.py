"""Job of the ingestion: raw images (folder, s3:// prefix, ImageFolder, file list, tar shards) to a manifest, corrupt images counted and skipped.

Wraps ``curation.ingest.run_ingest``.
"""

from __future__ import annotations

from typing import Any

from tasks.record import split_summary


def execute(config: dict[str, Any], inputs: dict[str, Any], output_uri: str, stage_dir: str,
            run: dict[str, Any]) -> dict[str, Any]:
    from curation.config import IngestConfig
    from curation.ingest import run_ingest
    from curation.stage_io import forget_result
    from dinov2_core.utils.config import from_dict

    forget_result(output_uri)  # the completion record decided this stage runs: no second opinion
    summary = run_ingest(from_dict(IngestConfig, config), inputs["source"], output_uri)
    result = split_summary(summary, output_uri)
    # reads lost to storage outages (within ingest.options.max_loss_fraction): the pipeline goes on with
    # what was read, but this result is never reused: the next run reads the source again
    result["complete"] = summary.get("complete", True)
    return result
