"""``dinov2-pipeline export``: write a trained backbone in the official hub layout, for timm, for Hugging Face
``transformers``, and as a full training state (student + teacher + heads).

Example::

    dinov2-pipeline export runs/pretrain --to all --out runs/pretrain/exports

writes ``hub/``, ``timm/``, ``hf/`` and ``full/`` under ``--out`` and prints the one call that loads each.
SRC is an export directory (``backbone.pth`` + ``model.json``), a training output directory (its newest
complete DCP checkpoint), a DCP checkpoint directory or a hub ``.pth`` file. ``full`` needs a checkpoint
(an export directory holds no student); with ``--to all`` it is skipped, with a note, for other sources.
"""

from __future__ import annotations

import argparse
import sys

CHOICES = ("hub", "timm", "hf", "full", "all")


def _stage_result_dir(src: str) -> str:
    """A pipeline stage directory (``<work_dir>/distill``) stands for the result that finished last in it."""
    from tasks.record import current_dir

    return current_dir(src) or src


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained backbone: official hub layout, timm, Hugging Face transformers, full training state",
        description="Export a trained backbone so that the official DINOv2 code, timm and transformers load it "
        "unchanged, or the full training state (student + teacher + DINO/iBOT heads) to continue pretraining. "
        "Prints the call that loads each export.",
    )
    parser.add_argument("src", metavar="SRC",
                        help="export dir (backbone.pth + model.json), training output dir, DCP checkpoint dir or .pth")
    parser.add_argument("--to", choices=CHOICES, default="all", help="target format (default: all)")
    parser.add_argument("--out", required=True, help="output directory; each format goes to <out>/<format>/")
    parser.add_argument("--img-size", type=int, default=None,
                        help="pos-embed grid of the exported backbone in pixels (default: 518 for hub with patch 14, "
                        "else the training size)")
    parser.add_argument("--weights-format", choices=("auto", "safetensors", "torch"), default="auto",
                        help="timm/hf/full weight files: safetensors (auto: when installed) or torch.save")
    parser.add_argument("--overwrite", action="store_true", help="replace existing <out>/<format>/ directories")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinov2_core.models.export_formats import FORMATS, ExportError, export, read_export_source

    formats = list(FORMATS) if args.to == "all" else [args.to]
    try:
        source = read_export_source(_stage_result_dir(args.src))
        if args.to == "all" and source.training_state is None:
            formats.remove("full")
            print(f"full: skipped ({args.src} holds no training checkpoint, only the published backbone)")
        results = export(source, args.out, formats, img_size=args.img_size, weights_format=args.weights_format,
                         overwrite=args.overwrite)
    except ExportError as err:
        print(f"dinov2-pipeline export: {err}", file=sys.stderr)
        return 2
    for name, info in results.items():
        print(f"{name}: {info['load']}")
        if info.get("note"):
            print(f"    ({info['note']})")
    return 0
