"""``dinov2-pipeline``: the command line.

Each command group lives in its own module under ``dinov2_pipeline.commands`` and registers its
sub-commands here. A module is imported only when the CLI starts, and heavy libraries (torch,
prefect, mlflow) are imported inside the command functions, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "dinov2_pipeline.commands.train",      # train
    "dinov2_pipeline.commands.evaluate",   # eval
    "dinov2_pipeline.commands.curation",   # ingest, embed, dedup, curate
    "dinov2_pipeline.commands.pipeline",   # run, resume, status, compare, deploy, demo
    "dinov2_pipeline.commands.export",     # export (hub, timm, hf, full)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinov2-pipeline",
        description="DINOv2 end to end: curate, deduplicate, pretrain, adapt, distill, evaluate.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # command group not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also follow options (``ingest SRC --output DIR a=1``); argparse alone
    # stops collecting positionals at the first option.
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
        "=" in item and not item.startswith("-") for item in extra
    ):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from dinov2_core.utils.config import ConfigError
    from tasks.workdir_lock import WorkDirLocked

    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"dinov2-pipeline: invalid configuration: {err}", file=sys.stderr)
        return 2
    except WorkDirLocked as err:
        print(f"dinov2-pipeline: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
