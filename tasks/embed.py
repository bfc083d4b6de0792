"""Job of the embedding extraction of the manifest's images with a frozen backbone, in shards.

Wraps ``curation.embed.run_embed``; it runs through the launcher (local subprocess or Slurm job).
When the pipeline decontaminates against an evaluation test set (``inputs["eval_images"]``), the same
job also embeds those images with the same config, into ``<output>/eval/embeddings`` (their manifest,
with row ids in the order the eval stage reads them, is ``<output>/eval/manifest.parquet``), so dedup
compares like with like.
"""

from __future__ import annotations

import os
from typing import Any

from dinov2_core.utils.uri import join_uri
from tasks.record import split_summary

EVAL_IMAGES_DIR = "eval"  # under embed's output: the test set's manifest and, in ``embeddings/``, its shards


def eval_embedding_uris(embed_output: str) -> tuple[str, str]:
    """``(manifest, embeddings)`` URIs of the eval test set under the embed stage's output."""
    base = join_uri(embed_output, EVAL_IMAGES_DIR)
    return join_uri(base, "manifest.parquet"), join_uri(base, "embeddings")


def execute(config: dict[str, Any], inputs: dict[str, Any], output_uri: str, stage_dir: str,
            run: dict[str, Any]) -> dict[str, Any]:
    from curation.config import EmbedConfig
    from curation.embed import run_embed
    from curation.stage_io import forget_result
    from dinov2_core.utils.config import from_dict

    cfg = from_dict(EmbedConfig, config)
    # every task of a multi-task job embeds its share of the shards; rank 0 holds the stage's result
    forget_result(output_uri)  # the completion record decided this stage runs: no second opinion
    pool = run_embed(cfg, inputs["manifest"], output_uri)
    eval_summary = None
    if inputs.get("eval_images"):
        manifest_uri, embeddings_uri = eval_embedding_uris(output_uri)
        write_eval_manifest(inputs["eval_images"], manifest_uri)
        eval_summary = run_embed(cfg, manifest_uri, embeddings_uri)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    result = split_summary(pool, output_uri)
    if eval_summary is not None:
        result["outputs"].update(eval_manifest=manifest_uri, eval_embeddings=eval_summary["embeddings"])
        result["metrics"].update(eval_num_embedded=eval_summary["num_embedded"],
                                 eval_num_failed=eval_summary["num_failed"])
    return result


def write_eval_manifest(source: str, manifest_uri: str) -> str:
    """Write the images of the eval set ``source`` (ImageFolder or labelled manifest, local or remote),
    listed exactly as the eval stage lists them, as a manifest with ``row_id`` for ``run_embed``.

    The file is rewritten only when its rows change: its modification stamp enters run_embed's
    fingerprints, so an unchanged eval set stays embedded across reruns of this job."""
    import pyarrow as pa

    from curation.stage_io import read_parquet, write_parquet
    from dinov2_core.eval.datasets import load_labelled_images
    from dinov2_core.utils.uri import exists

    images = load_labelled_images(source, require_labels=False)
    rows = [{"row_id": i, "uri": uri, "label": label}
            for i, (uri, label) in enumerate(zip(images.uris, images.labels))]
    if exists(manifest_uri) and read_parquet(manifest_uri).to_pylist() == rows:
        return manifest_uri
    schema = pa.schema([("row_id", pa.int64()), ("uri", pa.string()), ("label", pa.string())])
    return write_parquet(rows, manifest_uri, schema=schema)
