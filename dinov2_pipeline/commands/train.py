"""``dinov2-pipeline train CONFIG --output-dir DIR [key=value ...]``: run one training phase.

One process by default; under ``torchrun`` or ``srun`` every task runs this same command and the
trainer joins the process group from the environment. Re-running with the same output directory
resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging

USAGE = "dinov2-pipeline train CONFIG --output-dir DIR [--dry-run | --export-only] [KEY=VALUE ...]"


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default=None, help="run directory: checkpoints/, metrics.jsonl, export/")
    parser.add_argument("--dry-run", action="store_true", default=None,
                        help="print the resolved, validated config and exit")
    parser.add_argument("--export-only", action="store_true", default=None,
                        help="write DIR/export from DIR's newest complete checkpoint, without training")


def _run(args: argparse.Namespace) -> int:
    # Options may follow the positionals (CONFIG k=v --output-dir D k=v): parse the rest intermixed.
    inner = argparse.ArgumentParser(prog="dinov2-pipeline train", usage=USAGE)
    _add_options(inner)
    inner.add_argument("config")
    inner.add_argument("overrides", nargs="*")
    rest = inner.parse_intermixed_args(args.rest)
    output_dir = rest.output_dir or args.output_dir
    dry_run = bool(rest.dry_run or args.dry_run)
    if not output_dir and not dry_run:
        inner.error("--output-dir is required")

    from dinov2_core.train import export_from_checkpoint, load_train_config, run_training

    cfg = load_train_config(rest.config, rest.overrides)
    if dry_run:
        from dinov2_core.utils.config import to_dict

        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if rest.export_only or args.export_only:
        print(json.dumps({"export_dir": str(export_from_checkpoint(cfg, output_dir))}))
        return 0
    summary = run_training(cfg, output_dir)
    if summary.get("rank", 0) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "last_metrics"}, default=str))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        usage=USAGE,
        help="pretrain / adapt to 518 px / distill a ViT (FSDP2, resumable)",
        description="Run one training phase from a YAML recipe (configs/train/*.yaml). Overrides use dotted "
                    "keys, e.g. train.dataset=data/manifest.parquet optim.base_lr=1e-3 student.arch=vit_small.",
    )
    _add_options(parser)
    parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="CONFIG [KEY=VALUE ...]")
    parser.set_defaults(func=_run)
