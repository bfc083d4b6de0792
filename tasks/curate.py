"""Job of the retrieval-based curation (k-means clustering and balanced sampling) of the deduplicated images.

Wraps ``curation.curate.run_curate``.
"""

from __future__ import annotations

from typing import Any

from tasks.record import split_summary


def execute(config: dict[str, Any], inputs: dict[str, Any], output_uri: str, stage_dir: str,
            run: dict[str, Any]) -> dict[str, Any]:
    from curation.config import CurateConfig
    from curation.curate import run_curate
    from curation.stage_io import forget_result
    from dinov2_core.utils.config import from_dict

    forget_result(output_uri)  # the completion record decided this stage runs: no second opinion
    summary = run_curate(from_dict(CurateConfig, config), inputs["manifest"], inputs["embeddings"], output_uri)
    return split_summary(summary, output_uri)
