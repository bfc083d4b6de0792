"""``dinov2-pipeline run | resume | status | compare | deploy | demo``: the pipeline as users run it.

``run`` validates the whole config, then runs the end-to-end Prefect flow in this process (Prefect's
ephemeral API unless ``PREFECT_API_URL`` points at a server). ``resume`` re-runs a run directory:
finished stages are reused, an interrupted training stage continues from its last checkpoint, a Slurm
job that is still running is re-attached. ``demo`` does all of it on a small generated image set.
This module only parses and prints: the queries live beside the code that writes what they read
(``tasks.pipeline_run.run_status``, ``tasks.tracking.compare_runs``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CONFIG = os.path.join(REPO_ROOT, "configs", "pipeline", "demo.yaml")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run the end-to-end pipeline from a config (finished stages are reused)")
    p.add_argument("config", help="pipeline YAML, e.g. configs/pipeline/demo.yaml")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides, e.g. work_dir=/scratch/run1 launcher.kind=slurm")
    p.add_argument("--verbose", action="store_true", help="also show Prefect, MLflow and dask logs on the console")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, then print per stage what it would run (nodes x tasks, training plans) and exit")
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("resume", help="resume a run directory (or an MLflow parent run id)")
    p.add_argument("run", help="run directory (holds pipeline.yaml) or MLflow parent run id")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides applied to the run's config")
    p.add_argument("--verbose", action="store_true", help="also show Prefect, MLflow and dask logs on the console")
    p.set_defaults(func=cmd_resume)

    p = subparsers.add_parser("status", help="stages done / running / failed and job states of a run")
    p.add_argument("run", nargs="?", default=".", help="run directory (default: current directory)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("compare", help="table of pipeline runs from MLflow: what each recomputed, config differences, metrics")
    p.add_argument("runs", nargs="*", help="MLflow parent run ids, or run directories (every run of each: its "
                                           "history); default: the latest runs of the experiment")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: dinov2-pipeline)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: from the run dirs, or $MLFLOW_TRACKING_URI)")
    p.add_argument("--max-runs", type=int, default=10)
    p.add_argument("--metric", action="append", default=None,
                   help="show metrics whose name contains this (repeatable; default: top1, miou, map)")
    p.add_argument("--baselines", action="store_true", help="also show the random-init / raw-pixel baseline metrics")
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser("deploy", help="register the Prefect deployments (prefect deploy) with their config and schedule")
    p.add_argument("--config", default=None,
                   help="pipeline YAML the deployed flows run (default: the file's configs/pipeline/slurm_example.yaml)")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides the deployed runs apply to --config")
    p.add_argument("--cron", default=None, help="schedule of the end-to-end deployment, e.g. '0 3 * * 0' (weekly)")
    p.add_argument("--timezone", default="UTC", help="timezone of --cron (default: UTC)")
    p.add_argument("--name", action="append", default=None, help="deployment name(s) (default: all)")
    p.add_argument("--pool", default="dinov2-process", help="process work pool name")
    p.add_argument("--prefect-file", default=os.path.join(REPO_ROOT, "deployments", "prefect.yaml"))
    p.set_defaults(func=cmd_deploy)

    p = subparsers.add_parser("demo", help="the whole pipeline on a small generated image set, on this CPU")
    p.add_argument("--source", default=None, help="image folder or s3:// prefix instead of the generated images")
    p.add_argument("--work-dir", default="dinov2-demo", help="run directory (default: ./dinov2-demo)")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of configs/pipeline/demo.yaml")
    p.add_argument("--verbose", action="store_true", help="also show Prefect, MLflow and dask logs on the console")
    p.set_defaults(func=cmd_demo)


QUIET_LOGGERS = ("mlflow", "distributed", "dask", "curation", "tasks", "alembic", "httpx", "urllib3")


def prepare_environment(work_dir: str | None = None, verbose: bool = False) -> None:
    """Prefect settings and the console, set before anything imports Prefect (it reads its settings once,
    at import); never overriding what the user set. The console shows one line per stage plus warnings;
    ``--verbose`` adds Prefect's, MLflow's and dask's own logs."""
    import logging

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not os.environ.get("PREFECT_API_URL"):  # empty means "no server" to us, but breaks Prefect's events client
        os.environ.pop("PREFECT_API_URL", None)
    # the ephemeral API server can take >20 s to start on a loaded 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if not verbose:
        # Prefect's console handler only: flow and task logs still reach the Prefect API (the UI shows them)
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read by MLflow when it is imported
    if work_dir and not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME"):
        os.environ["PREFECT_HOME"] = os.path.join(os.path.abspath(work_dir), "prefect")
    progress = logging.getLogger("dinov2.progress")
    if not progress.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s  %(message)s", datefmt="%H:%M:%S"))
        from dinov2_core.utils.redact import RedactingFilter

        handler.addFilter(RedactingFilter())
        progress.addHandler(handler)
        progress.setLevel(logging.INFO)
        progress.propagate = False
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    # torch.export's notes on specialised shapes when the model is logged to MLflow: not actionable here
    logging.getLogger("torch._export").setLevel(logging.INFO if verbose else logging.ERROR)


def run_pipeline(cfg, config_path: str | None = None, overrides: list[str] | None = None):
    """Run the flow; with ``config_path`` the flow's parameters are the path and overrides (what the
    Prefect database stores), not the resolved config. The run directory's lock is taken first, so a
    second run on it is refused before Prefect starts (the flow takes the same lock again: re-entrant)."""
    from tasks.workdir_lock import WorkDirLock

    with WorkDirLock(cfg.work_dir):
        from flows.pipeline import dinov2_pipeline

        if config_path:
            return dinov2_pipeline(config_path=os.path.abspath(config_path), overrides=list(overrides or []))
        return dinov2_pipeline(config=cfg)


def cmd_run(args: argparse.Namespace) -> int:
    prepare_environment(verbose=args.verbose)
    from tasks.wiring import load_pipeline_config

    # every stage validated before anything runs (a dry run may be planned where the data is out of reach)
    cfg = load_pipeline_config(args.config, args.overrides, check_inputs=not args.dry_run)
    if args.dry_run:
        return print_plan(cfg)
    results = run_pipeline(cfg, args.config, args.overrides)
    print_summary(cfg, results)
    return 0


def find_run_dir(run: str) -> str:
    """A run directory from a path or an MLflow parent run id (searched in the default tracking URI)."""
    from dinov2_core.utils.config import ConfigError

    if os.path.isdir(run):
        if not os.path.exists(os.path.join(run, "pipeline.yaml")):
            raise ConfigError(f"run: {run!r} holds no pipeline.yaml; allowed: a run directory made by 'dinov2-pipeline run'")
        return os.path.abspath(run)
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        from mlflow import MlflowClient

        try:
            work_dir = MlflowClient(uri).get_run(run).data.tags.get("work_dir")
        except Exception:
            work_dir = None
        if work_dir and os.path.isdir(work_dir):
            return work_dir
    raise ConfigError(f"run: {run!r} is neither a run directory nor an MLflow run id known to MLFLOW_TRACKING_URI={uri!r}")


def cmd_resume(args: argparse.Namespace) -> int:
    prepare_environment(verbose=args.verbose)
    from dinov2_core.utils.config import ConfigError
    from tasks.wiring import load_pipeline_config

    run_dir = find_run_dir(args.run)
    saved = os.path.join(run_dir, "pipeline.yaml")
    with open(saved, encoding="utf-8") as handle:
        if "***" in handle.read():
            raise ConfigError(f"{saved}: secrets in the config were masked when it was saved; run "
                              "'dinov2-pipeline run' with the original config on the same work_dir, or pass "
                              "secrets through the environment (AWS_*, MLFLOW_TRACKING_PASSWORD, ...)")
    cfg = load_pipeline_config(saved, args.overrides)
    results = run_pipeline(cfg, saved, args.overrides)
    print_summary(cfg, results)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tasks.pipeline_run import run_status

    run_dir = find_run_dir(args.run)
    status = run_status(run_dir)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    record = status["run"]
    runs = status["runs"]
    title = f"{record.get('name', '')} — {run_dir} (run #{runs[-1]['run_number'] if runs else '?'}: {record.get('status', 'unknown')})"
    table = Table(title=title)
    for column in ("stage", "status", "why", "job", "job state", "iteration", "seconds", "error"):
        table.add_column(column, overflow="fold")
    for stage, info in status["stages"].items():
        status_text = info["status"] if info["outcome"] in (info["status"], None) else f"{info['status']} ({info['outcome']})"
        table.add_row(stage, status_text, info.get("reason", ""), info.get("job", ""), info.get("job_state", ""),
                      str(info.get("iteration", "") or ""), str(info.get("seconds", "") or ""), info.get("error", ""))
    Console(width=160).print(table)
    if record.get("mlflow_parent_run_id"):
        print(f"MLflow parent run: {record['mlflow_parent_run_id']} ({record.get('tracking_uri')}); "
              f"history: dinov2-pipeline compare {run_dir}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tasks.pipeline_run import read_run_file
    from tasks.tracking import compare_runs

    run_ids, work_dirs, uri = [], [], args.tracking_uri
    experiment = args.experiment
    for item in args.runs:
        if os.path.isdir(item):
            record = read_run_file(item)
            work_dirs.append(record.get("work_dir") or os.path.abspath(item))
            uri = uri or record.get("tracking_uri")
            experiment = experiment or record.get("experiment")
        else:
            run_ids.append(item)
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        print("compare: give --tracking-uri (e.g. sqlite:///RUN_DIR/mlflow.db) or run directories", file=sys.stderr)
        return 2
    columns, rows = compare_runs(uri, experiment or "dinov2-pipeline", run_ids, args.max_runs,
                                 tuple(args.metric or ("top1", "miou", "map")), args.baselines, work_dirs)
    if not rows:
        print("compare: no pipeline runs found")
        return 1
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pipeline runs ({uri})")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*[str(row.get(c, "")) for c in columns])
    Console(width=max(100, 24 * len(columns))).print(table)  # wide enough that metric names stay whole
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """``prefect work-pool create`` (if missing) + ``prefect deploy``; needs PREFECT_API_URL (a server)."""
    from deployments.deploy import deploy

    parameters = None
    if args.config:
        from tasks.wiring import load_pipeline_config

        load_pipeline_config(args.config, args.overrides)  # a scheduled run must not fail on a typo next week
        parameters = {"config_path": os.path.abspath(args.config), "overrides": list(args.overrides)}
    elif args.overrides:
        print("deploy: KEY=VALUE overrides need --config FILE", file=sys.stderr)
        return 2
    try:
        deploy(args.name, args.pool, args.prefect_file, parameters=parameters, cron=args.cron, timezone=args.timezone)
    except RuntimeError as err:
        print(f"deploy: {err}", file=sys.stderr)
        return 2
    print(f"Deployments registered on {os.environ['PREFECT_API_URL']}"
          + (f" (config {parameters['config_path']}, overrides {parameters['overrides']})" if parameters else "")
          + (f", schedule '{args.cron}' {args.timezone}" if args.cron else "") + ".\n"
          f"Start a worker (on a node that can run sbatch):\n  prefect worker start --pool {args.pool}\n"
          f"Trigger a run:\n  prefect deployment run 'dinov2-pipeline/pipeline'")
    return 0


def prepare_demo_data(data_dir: str) -> dict[str, str]:
    """The built-in generated image set: a training folder (pretraining + kNN train) and a test folder."""
    from dinov2_core.data.synthetic import make_classification_splits

    marker = os.path.join(data_dir, "test", "manifest.parquet")
    if not os.path.exists(marker):
        make_classification_splits(data_dir, num_classes=4, train_per_class=96, test_per_class=32, image_size=32,
                                   seed=0, kind="pattern")
    return {"train": os.path.join(data_dir, "train"), "test": marker,
            "train_manifest": os.path.join(data_dir, "train", "manifest.parquet")}


def cmd_demo(args: argparse.Namespace) -> int:
    work_dir = os.path.abspath(args.work_dir)
    prepare_environment(work_dir, verbose=args.verbose)
    from tasks.wiring import load_pipeline_config

    started = time.time()
    data = prepare_demo_data(os.path.join(work_dir, "data"))
    overrides = [f"work_dir={work_dir}", f"eval.val_manifest={data['test']}"]
    if args.source:
        overrides.append(f"source={args.source}")
    else:
        overrides += [f"source={data['train']}", f"eval.train_manifest={data['train_manifest']}"]
    overrides += args.overrides
    cfg = load_pipeline_config(DEMO_CONFIG, overrides)
    print(f"demo: running the pipeline in {work_dir} (images: {cfg.source})")
    results = run_pipeline(cfg, DEMO_CONFIG, overrides)
    print_summary(cfg, results)
    print(f"\ndemo finished in {time.time() - started:.0f} s")
    return 0


def print_plan(cfg) -> int:
    """``run --dry-run``: what each enabled stage would run as, and the training plan of each training stage."""
    from dinov2_core.utils.config import ConfigError
    from tasks.wiring import check_inputs_reachable, enabled_stages, plan_stages

    print(f"pipeline {cfg.name}: {' -> '.join(enabled_stages(cfg))} in {cfg.work_dir} ({cfg.launcher.kind} launcher)")
    try:
        check_inputs_reachable(cfg)
    except ConfigError as err:
        print(f"warning (a real run would stop here): {err}")
    for stage, text in plan_stages(cfg).items():
        print(f"\n=== {stage} ===\n{text}")
    return 0


def print_summary(cfg, results: dict[str, Any]) -> None:
    """What each stage did, the evaluation table, where outputs are, how to open the MLflow and Prefect UIs."""
    from tasks.report import evaluation_tables, pca_figures

    print("\n=== stages ===")
    for stage, result in results.items():
        print(f"  {stage:9s} {result.outcome:10s} {result.seconds:7.1f} s  {result.reason}")
    for name, table in evaluation_tables(results).items():
        print(f"\n=== evaluation of the {name} backbone (kNN on frozen features; random-init and raw-pixel baselines) ===")
        print(table)
    figures = pca_figures(results)
    if figures:
        print("PCA feature maps:\n" + "\n".join(f"  {p}" for p in figures))
    plots = [os.path.join(r.outputs["dir"], "loss_curve.png") for s, r in results.items() if s in ("pretrain", "highres", "distill")]
    plots = [p for p in plots if os.path.exists(p)]
    if plots:
        print("loss curves:\n" + "\n".join(f"  {p}" for p in plots))
    report = results.get("report")
    if report is not None:
        print(f"report: {report.outputs.get('report')}")
        model = report.extra.get("model") or {}
        if model.get("registered_name"):
            state = "new version" if model.get("new_version") else "unchanged weights, no new version"
            print(f"model registry: {model['registered_name']} version {model['registered_version']} ({state})")
    if cfg.tracking.enabled:
        from dinov2_core.utils.redact import redact_text

        print(f"\nMLflow UI:  mlflow ui --backend-store-uri {redact_text(cfg.mlflow_uri)}   (then open http://127.0.0.1:5000)")
    home = os.environ.get("PREFECT_HOME")
    if not os.environ.get("PREFECT_API_URL"):
        prefix = f"PREFECT_HOME={home} " if home else ""
        print(f"Prefect UI: {prefix}prefect server start   (then open http://127.0.0.1:4200)")
    print(f"status:     dinov2-pipeline status {cfg.work_dir}")
