"""Job of the near-duplicate removal (k-NN + crowding-adjusted cosine threshold + keep-first grouping) on the embeddings.

Wraps ``curation.dedup.run_dedup``. With ``inputs["eval_embeddings"]`` (the eval test set, embedded by
the embed stage) it also drops training images that are near-duplicates of evaluation images and
writes the decontamination list to ``decontam_list_uri`` (output ``decontamination_list``).
"""

from __future__ import annotations

from typing import Any

from tasks.record import split_summary


def execute(config: dict[str, Any], inputs: dict[str, Any], output_uri: str, stage_dir: str,
            run: dict[str, Any]) -> dict[str, Any]:
    from curation.config import DedupConfig
    from curation.dedup import run_dedup
    from curation.stage_io import forget_result
    from dinov2_core.utils.config import from_dict

    forget_result(output_uri)  # the completion record decided this stage runs: no second opinion
    summary = run_dedup(from_dict(DedupConfig, config), inputs["manifest"], inputs["embeddings"], output_uri,
                        eval_embeddings_uri=inputs.get("eval_embeddings"))
    return split_summary(summary, output_uri)
