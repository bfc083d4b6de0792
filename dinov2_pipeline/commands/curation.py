"""``dinov2-pipeline ingest | embed | dedup | curate``: the data stages from the command line.

Examples::

    dinov2-pipeline ingest /data/raw --output runs/ingest cluster.n_workers=4
    dinov2-pipeline embed runs/ingest/manifest.parquet --output runs/embeddings
    dinov2-pipeline dedup runs/ingest/manifest.parquet --embeddings runs/embeddings --output runs/dedup \
        --eval-embeddings runs/eval_embeddings threshold=0.93
    dinov2-pipeline curate runs/dedup/manifest.parquet --embeddings runs/embeddings --output runs/curated \
        --config configs/curation/curate.yaml target_size=100000

Each prints the stage's result (output URIs and counts) as JSON. ``--config FILE`` is a YAML file of
the stage's config keys (see ``configs/curation/``); ``KEY=VALUE`` arguments override it.
"""

from __future__ import annotations

import argparse
import json


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="output directory (local path or s3:// prefix)")
    parser.add_argument("--config", help="YAML config file (see configs/curation/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. cluster.n_workers=4")


def register(subparsers: argparse._SubParsersAction) -> None:
    ingest = subparsers.add_parser("ingest", help="list, hash and decode-check raw images into manifest.parquet",
                                   description="Sources: a directory or s3:// prefix, an ImageFolder tree, a file "
                                   "list (.txt/.csv/.jsonl/.parquet) or tar shards (.tar or a directory of them).")
    ingest.add_argument("source", help="directory, s3:// prefix, file list or .tar shard(s)")
    _add_common(ingest)
    ingest.set_defaults(func=_run, stage="ingest")

    embed = subparsers.add_parser("embed", help="L2-normalised embeddings of every manifest row, in shards")
    embed.add_argument("manifest", help="manifest.parquet from ingest (or dedup)")
    _add_common(embed)
    embed.set_defaults(func=_run, stage="embed")

    dedup = subparsers.add_parser("dedup", help="remove exact and near duplicates and eval-set contamination")
    dedup.add_argument("manifest", help="manifest.parquet from ingest")
    dedup.add_argument("--embeddings", required=True, help="embedding shards directory from embed")
    dedup.add_argument("--eval-embeddings", help="embedding shards of the evaluation set to decontaminate against")
    _add_common(dedup)
    dedup.set_defaults(func=_run, stage="dedup")

    curate = subparsers.add_parser("curate", help="retrieval and balanced hierarchical k-means sampling")
    curate.add_argument("manifest", help="manifest.parquet (usually from dedup)")
    curate.add_argument("--embeddings", required=True, help="embedding shards directory of the pool")
    curate.add_argument("--seed-embeddings", help="embedding shards of seed images (retrieval modes)")
    _add_common(curate)
    curate.set_defaults(func=_run, stage="curate")


def _require(key: str, uri: str | None) -> None:
    """An input path that must exist before the stage starts (a clear error, not a traceback from inside it)."""
    from dinov2_core.utils.config import ConfigError
    from dinov2_core.utils.uri import exists

    if uri and not exists(uri):
        raise ConfigError(f"{key}: {uri!r} does not exist (or is not readable with the current credentials)")


def _run(args: argparse.Namespace) -> int:
    from dinov2_core.utils.config import load_config

    from curation import config as cfgs

    config_class = {"ingest": cfgs.IngestConfig, "embed": cfgs.EmbedConfig, "dedup": cfgs.DedupConfig,
                    "curate": cfgs.CurateConfig}[args.stage]
    cfg = load_config(config_class, args.config, args.overrides)  # the config first, then its inputs
    for key in ("source", "manifest", "embeddings", "eval_embeddings", "seed_embeddings"):
        _require(key, getattr(args, key, None))

    if args.stage == "ingest":
        from curation.ingest import run_ingest

        result = run_ingest(cfg, args.source, args.output)
    elif args.stage == "embed":
        from curation.embed import run_embed

        result = run_embed(cfg, args.manifest, args.output)
    elif args.stage == "dedup":
        from curation.dedup import run_dedup

        result = run_dedup(cfg, args.manifest, args.embeddings, args.output, args.eval_embeddings)
    else:
        from curation.curate import run_curate

        result = run_curate(cfg, args.manifest, args.embeddings, args.output, args.seed_embeddings)
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0
