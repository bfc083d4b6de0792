"""``dinov2-pipeline run | resume | status | compare | deploy | demo``: the pipeline as users run it.

``run`` validates the whole config, then runs the end-to-end Prefect flow in this process (Prefect's
ephemeral API unless ``PREFECT_API_URL`` points at a server). ``resume`` re-runs a run directory:
finished stages are skipped, an interrupted training stage continues from its last checkpoint, a
Slurm job that is still running is re-attached. ``demo`` does all of it on a small generated image set.
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
    p = subparsers.add_parser("run", help="run the end-to-end pipeline from a config (finished stages are skipped)")
    p.add_argument("config", help="pipeline YAML, e.g. configs/pipeline/demo.yaml")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides, e.g. work_dir=/scratch/run1 launcher.kind=slurm")
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("resume", help="resume a run directory (or an MLflow parent run id)")
    p.add_argument("run", help="run directory (holds pipeline.yaml) or MLflow parent run id")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides applied to the saved config")
    p.set_defaults(func=cmd_resume)

    p = subparsers.add_parser("status", help="stages done / running / failed and job states of a run")
    p.add_argument("run", nargs="?", default=".", help="run directory (default: current directory)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("compare", help="table of pipeline runs from MLflow: config differences and metrics")
    p.add_argument("runs", nargs="*", help="MLflow parent run ids or run directories (default: latest runs)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: dinov2-pipeline)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: from the run dirs, or $MLFLOW_TRACKING_URI)")
    p.add_argument("--max-runs", type=int, default=10)
    p.add_argument("--metric", action="append", default=None,
                   help="show metrics whose name contains this (repeatable; default: top1, miou, map)")
    p.add_argument("--baselines", action="store_true", help="also show the random-init / raw-pixel baseline metrics")
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser("deploy", help="register the Prefect deployments (prefect deploy) and print the worker command")
    p.add_argument("--name", action="append", default=None, help="deployment name(s) (default: all)")
    p.add_argument("--pool", default="dinov2-process", help="process work pool name")
    p.add_argument("--prefect-file", default=os.path.join(REPO_ROOT, "deployments", "prefect.yaml"))
    p.set_defaults(func=cmd_deploy)

    p = subparsers.add_parser("demo", help="the whole pipeline on a small generated image set, on this CPU")
    p.add_argument("--source", default=None, help="image folder or s3:// prefix instead of the generated images")
    p.add_argument("--work-dir", default="dinov2-demo", help="run directory (default: ./dinov2-demo)")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of configs/pipeline/demo.yaml")
    p.set_defaults(func=cmd_demo)


def _prefect_env(work_dir: str | None = None) -> None:
    """Quiet, self-contained Prefect defaults (never overriding what the user set)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # the ephemeral API server can take >20 s to start on a loaded 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if work_dir and not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME"):
        os.environ["PREFECT_HOME"] = os.path.join(os.path.abspath(work_dir), "prefect")


def run_pipeline(cfg) -> dict[str, Any]:
    from flows.pipeline import dinov2_pipeline

    return dinov2_pipeline(config=cfg)


def cmd_run(args: argparse.Namespace) -> int:
    from tasks.config import load_pipeline_config

    cfg = load_pipeline_config(args.config, args.overrides)  # every stage validated before anything runs
    _prefect_env()
    results = run_pipeline(cfg)
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
    from tasks.config import load_pipeline_config

    run_dir = find_run_dir(args.run)
    cfg = load_pipeline_config(os.path.join(run_dir, "pipeline.yaml"), args.overrides)
    _prefect_env()
    results = run_pipeline(cfg)
    print_summary(cfg, results)
    return 0


def collect_status(run_dir: str) -> dict[str, Any]:
    from tasks.config import STAGES
    from tasks.stage import read_json, read_state, read_success

    record = read_json(os.path.join(run_dir, "_run.json")) or {}
    stages = {}
    for stage in STAGES:
        stage_dir = os.path.join(run_dir, stage)
        if not os.path.isdir(stage_dir):
            continue
        state = read_state(stage_dir)
        success = read_success(stage_dir)
        info: dict[str, Any] = {"status": "done" if success else state.get("status", "pending")}
        if success:
            info["finished_at"] = success.get("finished_at")
            info["seconds"] = success.get("result", {}).get("seconds")
        if state.get("error") and not success:
            info["error"] = state["error"].splitlines()[0][:200]
        job = state.get("job")
        if job:
            info["job"] = f"{job['kind']} {job['job_id']}"
            if job["kind"] == "slurm" and not success:
                info["job_state"] = _slurm_state(job)
        metrics = os.path.join(stage_dir, "metrics.jsonl")
        if os.path.exists(metrics) and not success:
            last = _last_line(metrics)
            if last:
                info["iteration"] = last.get("iteration")
        stages[stage] = info
    return {"run_dir": run_dir, "run": record, "stages": stages}


def _slurm_state(job: dict[str, Any]) -> str:
    try:
        import submitit

        return str(submitit.SlurmJob(job["folder"], job["job_id"]).state)
    except Exception as err:  # sacct not reachable from here
        return f"unknown ({type(err).__name__})"


def _last_line(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as handle:
            lines = handle.read().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, json.JSONDecodeError):
        return None


def cmd_status(args: argparse.Namespace) -> int:
    run_dir = find_run_dir(args.run)
    status = collect_status(run_dir)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    record = status["run"]
    table = Table(title=f"{record.get('name', '')} — {run_dir} ({record.get('status', 'unknown')})")
    for column in ("stage", "status", "job", "job state", "iteration", "seconds", "error"):
        table.add_column(column)
    for stage, info in status["stages"].items():
        table.add_row(stage, info["status"], info.get("job", ""), info.get("job_state", ""),
                      str(info.get("iteration", "")), str(info.get("seconds", "") or ""), info.get("error", ""))
    Console().print(table)
    if record.get("mlflow_parent_run_id"):
        print(f"MLflow parent run: {record['mlflow_parent_run_id']} ({record.get('tracking_uri')})")
    return 0


def compare_runs(
    tracking_uri: str, experiment: str, run_ids: list[str], max_runs: int,
    metric_filter: tuple[str, ...] = ("top1", "miou", "map"), baselines: bool = False,
) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows: params that differ between the runs, then their metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return [], []
        runs = client.search_runs(
            [found.experiment_id], filter_string="tags.pipeline = 'dinov2'", order_by=["attributes.start_time DESC"],
            max_results=max_runs,
        )
    keys = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1 and not k.endswith(("work_dir", ".name"))]
    metrics = sorted({
        k for r in runs for k in r.data.metrics
        if any(f in k for f in metric_filter) and (baselines or "baseline" not in k)
    })
    columns = ["run", "name", "status", *differing, *metrics]
    rows = []
    for r in runs:
        row = {"run": r.info.run_id[:8], "name": r.info.run_name or "", "status": r.info.status}
        row.update({k: r.data.params.get(k, "") for k in differing})
        row.update({k: (f"{r.data.metrics[k]:.4g}" if k in r.data.metrics else "") for k in metrics})
        rows.append(row)
    return columns, rows


def cmd_compare(args: argparse.Namespace) -> int:
    from tasks.stage import read_json

    run_ids, uri = [], args.tracking_uri
    experiment = args.experiment
    for item in args.runs:
        if os.path.isdir(item):
            record = read_json(os.path.join(item, "_run.json")) or {}
            run_ids.append(record.get("mlflow_parent_run_id"))
            uri = uri or record.get("tracking_uri")
            experiment = experiment or record.get("experiment")
        else:
            run_ids.append(item)
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        print("compare: give --tracking-uri (e.g. sqlite:///RUN_DIR/mlflow.db) or run directories", file=sys.stderr)
        return 2
    columns, rows = compare_runs(uri, experiment or "dinov2-pipeline", [r for r in run_ids if r], args.max_runs,
                                 tuple(args.metric or ("top1", "miou", "map")), args.baselines)
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

    try:
        deploy(args.name, args.pool, args.prefect_file)
    except RuntimeError as err:
        print(f"deploy: {err}", file=sys.stderr)
        return 2
    print(f"Deployments registered on {os.environ['PREFECT_API_URL']}. Start a worker (on a node that can run sbatch):\n"
          f"  prefect worker start --pool {args.pool}\n"
          f"Trigger a run:\n  prefect deployment run 'dinov2-pipeline/pipeline'")
    return 0


def prepare_demo_data(data_dir: str) -> dict[str, str]:
    """The built-in generated image set: a training folder (pretraining + kNN train) and a test folder."""
    from dinov2_core.data.synthetic import make_classification_splits

    marker = os.path.join(data_dir, "test", "manifest.parquet")
    if not os.path.exists(marker):
        make_classification_splits(data_dir, num_classes=4, train_per_class=48, test_per_class=16, image_size=32, seed=0)
    return {"train": os.path.join(data_dir, "train"), "test": marker,
            "train_manifest": os.path.join(data_dir, "train", "manifest.parquet")}


def cmd_demo(args: argparse.Namespace) -> int:
    from tasks.config import load_pipeline_config

    work_dir = os.path.abspath(args.work_dir)
    started = time.time()
    data = prepare_demo_data(os.path.join(work_dir, "data"))
    overrides = [f"work_dir={work_dir}", f"eval.val_manifest={data['test']}"]
    if args.source:
        overrides.append(f"source={args.source}")
    else:
        overrides += [f"source={data['train']}", f"eval.train_manifest={data['train_manifest']}"]
    cfg = load_pipeline_config(DEMO_CONFIG, [*overrides, *args.overrides])
    _prefect_env(work_dir)
    print(f"demo: running the pipeline in {work_dir} (images: {cfg.source})")
    results = run_pipeline(cfg)
    print_summary(cfg, results)
    print(f"\ndemo finished in {time.time() - started:.0f} s")
    return 0


def print_summary(cfg, results: dict[str, Any]) -> None:
    """The evaluation table, where outputs are, and how to open the MLflow and Prefect UIs."""
    from tasks.report import evaluation_tables

    print("\n=== stages ===")
    for stage, result in results.items():
        print(f"  {stage:9s} {result.get('seconds', 0):7.1f} s  {(result.get('outputs') or {}).get('dir', '')}")
    for name, table in evaluation_tables(results).items():
        print(f"\n=== evaluation of the {name} backbone (kNN on frozen features; random-init and raw-pixel baselines) ===")
        print(table)
    eval_outputs = (results.get("eval") or {}).get("outputs") or {}
    pca = [p for v in eval_outputs.values() if isinstance(v, dict) for p in v.get("pca_maps", [])]
    if pca:
        print("PCA feature maps:\n" + "\n".join(f"  {p}" for p in pca))
    plots = [os.path.join(cfg.stage_dir(s), "loss_curve.png") for s in ("pretrain", "highres", "distill")]
    plots = [p for p in plots if os.path.exists(p)]
    if plots:
        print("loss curves:\n" + "\n".join(f"  {p}" for p in plots))
    report = ((results.get("report") or {}).get("outputs") or {}).get("report")
    if report:
        print(f"report: {report}")
    model = (results.get("report") or {}).get("model") or {}
    if model.get("registered_name"):
        print(f"model registry: {model['registered_name']} version {model['registered_version']} ({model['model_uri']})")
    if cfg.tracking.enabled:
        print(f"\nMLflow UI:  mlflow ui --backend-store-uri {cfg.mlflow_uri}   (then open http://127.0.0.1:5000)")
    home = os.environ.get("PREFECT_HOME")
    if not os.environ.get("PREFECT_API_URL"):
        prefix = f"PREFECT_HOME={home} " if home else ""
        print(f"Prefect UI: {prefix}prefect server start   (then open http://127.0.0.1:4200)")
    print(f"status:     dinov2-pipeline status {cfg.work_dir}")
