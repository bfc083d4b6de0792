"""``dinov2-pipeline eval``: frozen-feature evaluation of a backbone (or a random-init baseline).

Example::

    dinov2-pipeline eval --backbone runs/pretrain/export --train data/train --test data/test \
        --config configs/eval/default.yaml linear.iterations=2000 --output-dir runs/eval

prints the Markdown table (backbone / random init / raw pixels) and writes ``metrics.json``,
``report.md``, ``pca_*.png`` and ``decontamination.txt`` under ``--output-dir``.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a backbone on frozen features (kNN, linear, logreg, retrieval, dense, PCA)",
        description="Evaluate a backbone on frozen features and compare it with random-init and raw-pixel "
        "baselines. Options override the --config file; KEY=VALUE overrides any config key "
        "(e.g. knn.ks=[10,20] linear.iterations=500).",
    )
    parser.add_argument("--backbone", help="export directory (backbone.pth + model.json) or official hub .pth")
    parser.add_argument("--arch", help="backbone arch for a random-init run (with --random-init), e.g. vit_small")
    parser.add_argument("--random-init", action="store_true", help="evaluate --arch at random initialisation")
    parser.add_argument("--train", help="train images: ImageFolder directory or labelled manifest (local or s3://)")
    parser.add_argument("--test", help="test images: ImageFolder directory or labelled manifest")
    parser.add_argument("--config", help="YAML config (see configs/eval/)")
    parser.add_argument("--output-dir", required=True, help="where metrics.json, report.md and PNGs go")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinov2_core.eval import EvalConfig, run_evaluation
    from dinov2_core.utils.config import apply_overrides, from_dict, load_yaml

    data = load_yaml(args.config) if args.config else {}
    for key, value in (("backbone", args.backbone), ("arch", args.arch), ("train", args.train), ("test", args.test)):
        if value is not None:
            data[key] = value
    if args.random_init:
        data["random_init"] = True
    cfg = from_dict(EvalConfig, apply_overrides(data, list(args.overrides)))
    result = run_evaluation(cfg, args.output_dir)
    print(result["table"], end="")
    print(f"\nwrote {result['files']['metrics']} and {result['files']['report']}")
    return 0
