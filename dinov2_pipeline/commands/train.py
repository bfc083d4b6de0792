"""``dinov2-pipeline train CONFIG --output-dir DIR [key=value ...]``: run one training phase.

One process by default; under ``torchrun`` or ``srun`` every task runs this same command and the
trainer joins the process group from the environment. Re-running with the same output directory
resumes from its newest complete checkpoint. ``--dry-run`` validates the config and prints the plan
of the run (:func:`dinov2_core.train.plan.plan_training`) for the given launcher resources; with
``--json`` it prints the resolved config and the plan as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging

from tasks.launch import slurm_partition_max_time_min

USAGE = ("dinov2-pipeline train CONFIG --output-dir DIR [--export-only] [KEY=VALUE ...]\n"
         "       dinov2-pipeline train CONFIG --dry-run [--json] [--nodes N --tasks-per-node T --gpus-per-node G "
         "--timeout-min M --max-requeues R --seconds-per-iter S --partition P --gpu-memory-gb GB] [KEY=VALUE ...]")
def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default=None, help="run directory: checkpoints/, metrics.jsonl, export/")
    parser.add_argument("--dry-run", action="store_true", default=None,
                        help="validate the config and print the plan (world size, batch, lr, parameters, memory per "
                             "GPU, checkpoint size, time coverage) without training")
    parser.add_argument("--json", action="store_true", default=None,
                        help="with --dry-run: print {config: resolved config, plan: ...} as JSON")
    parser.add_argument("--nodes", type=int, default=None, help="plan: nodes (default 1)")
    parser.add_argument("--tasks-per-node", type=int, default=None, help="plan: tasks per node (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="plan: GPUs per node (default 1; 0 = CPU)")
    parser.add_argument("--timeout-min", type=int, default=None, help="plan: the job time limit in minutes")
    parser.add_argument("--max-requeues", type=int, default=None, help="plan: requeues allowed after time-outs")
    parser.add_argument("--seconds-per-iter", type=float, default=None, help="plan: measured seconds per iteration")
    parser.add_argument("--partition", default=None, help="plan: Slurm partition whose MaxTime (sinfo) is checked")
    parser.add_argument("--gpu-memory-gb", type=float, default=None, help="plan: GPU memory (default 80)")
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
    if dry_run:  # a plan for a cluster may be made where its data cannot be reached
        print(_dry_run_report(cfg, rest, args))
        return 0
    _require_inputs(cfg)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if rest.export_only or args.export_only:
        print(json.dumps({"export_dir": str(export_from_checkpoint(cfg, output_dir))}))
        return 0
    summary = run_training(cfg, output_dir)
    if summary.get("rank", 0) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "last_metrics"}, default=str))
    return 0


def _option(rest: argparse.Namespace, args: argparse.Namespace, name: str, default=None):
    """An option given after CONFIG (``rest``) or before it (``args``)."""
    for namespace in (rest, args):
        value = getattr(namespace, name, None)
        if value is not None:
            return value
    return default


def _require_inputs(cfg) -> None:
    """The dataset and checkpoints the recipe reads exist now, not at the first batch of every rank."""
    from dinov2_core.utils.config import ConfigError
    from dinov2_core.utils.uri import exists

    named = {"train.dataset": cfg.train.dataset, "init_from": cfg.init_from,
             "distill.teacher_path": cfg.distill.teacher_path if cfg.phase == "distill" else None}
    for key, uri in named.items():
        if uri and not exists(uri):
            raise ConfigError(f"{key}: {uri!r} does not exist (or is not readable with the current credentials)")


def _dry_run_report(cfg, rest: argparse.Namespace, args: argparse.Namespace) -> str:
    from dinov2_core.train.plan import DEFAULT_GPU_MEMORY_GB, plan_training
    from dinov2_core.utils.config import to_dict

    plan = plan_training(
        cfg,
        nodes=_option(rest, args, "nodes", 1),
        tasks_per_node=_option(rest, args, "tasks_per_node", 1),
        gpus_per_node=_option(rest, args, "gpus_per_node", 1),
        timeout_min=_option(rest, args, "timeout_min"),
        max_requeues=_option(rest, args, "max_requeues"),
        partition_max_time_min=slurm_partition_max_time_min(_option(rest, args, "partition")),
        seconds_per_iter=_option(rest, args, "seconds_per_iter"),
        gpu_memory_gb=_option(rest, args, "gpu_memory_gb", DEFAULT_GPU_MEMORY_GB),
    )
    if _option(rest, args, "json"):
        return json.dumps({"config": to_dict(cfg), "plan": plan.to_dict()}, indent=2)
    return plan.render()


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
