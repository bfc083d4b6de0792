"""MLflow tracking for pipeline runs: one parent run per pipeline run, one child run per stage.

Only the controller (the flow process) talks to MLflow: Slurm jobs write ``metrics.jsonl`` on the
shared filesystem and the controller forwards new rows while it polls. That keeps a SQLite backend
safe (one writer) and means compute nodes never need to reach the tracking server.

Children are linked with the ``mlflow.parentRunId`` tag, which every MLflow client and the UI honour.
Parameters are the flattened config; keys are sanitised to MLflow's alphabet (names can come from data,
e.g. an image mode ``I;16``) and every value and tag goes through the secret scrubber.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

from dinov2_core.utils.config import flatten
from dinov2_core.utils.redact import redact, redact_text

PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment of this kind on its runs table (model training), not the GenAI overview
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
MAX_PARAM_CHARS = 500
MAX_KEY_CHARS = 250
UNSAFE_KEY_CHARS = re.compile(r"[^\w.\- /:]")


def mlflow_key(key: str) -> str:
    """``key`` in the characters MLflow accepts for param, metric and tag names."""
    return UNSAFE_KEY_CHARS.sub("_", key)[:MAX_KEY_CHARS]


def scrub(params: dict[str, Any]) -> dict[str, str]:
    """Flattened params as strings with safe keys and secrets masked, cut to MLflow's limits."""
    out = {}
    for key, value in flatten(redact(params)).items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        out[mlflow_key(key)] = text[:MAX_PARAM_CHARS]
    return out


def default_artifact_location(uri: str) -> str | None:
    """Artifacts of an embedded SQLite store live next to the database file.

    Without this MLflow uses ``./mlruns`` relative to whatever directory the process started in. A
    tracking server decides for itself (``--artifacts-destination``), so ``None`` there.
    """
    if not uri.startswith("sqlite:///"):
        return None
    db_path = Path(uri[len("sqlite:///"):])
    return (db_path.parent / "mlartifacts").resolve().as_uri()


class Tracker:
    """Thin wrapper over ``MlflowClient``; every call names its run explicitly (no global active run)."""

    def __init__(self, uri: str, experiment: str) -> None:
        from mlflow import MlflowClient

        # MLflow prints "View run ... at <server URL>" at every run's end: the URL may carry credentials,
        # and the console shows one line per stage
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.uri = uri
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None and EXPERIMENT_KIND_TAG not in (found.tags or {}):
            self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self.experiment_id = (
            found.experiment_id
            if found
            else self.client.create_experiment(experiment, artifact_location=default_artifact_location(uri),
                                               tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        )

    def start_run(self, name: str, params: dict[str, Any], tags: dict[str, str], parent_id: str | None = None) -> str:
        from mlflow.entities import Param

        tags = {mlflow_key(k): redact_text(str(v)) for k, v in tags.items() if v is not None}
        if parent_id:
            tags[PARENT_TAG] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        items = [Param(k, v) for k, v in scrub(params).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run.info.run_id, params=items[start : start + 100])
        return run.info.run_id

    def run_exists(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # MlflowException: unknown run id (e.g. a new tracking DB)
            return False

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            if value is not None:
                self.client.set_tag(run_id, mlflow_key(key), redact_text(str(value)))

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [
            Metric(mlflow_key(key), float(value), now, step or 0)
            for key, value in flatten(metrics).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        ]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start : start + 500])

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        if os.path.isdir(path):
            self.client.log_artifacts(run_id, path, artifact_path)
        elif os.path.exists(path):
            self.client.log_artifact(run_id, path, artifact_path)

    @contextlib.contextmanager
    def system_metrics(self, run_id: str, enabled: bool = True) -> Iterator[None]:
        """Sample CPU/memory/disk (psutil) into ``run_id`` while a stage runs on this machine."""
        monitor = None
        if enabled:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                monitor = SystemMetricsMonitor(run_id, sampling_interval=5, tracking_uri=self.uri)
                monitor.start()
            except Exception:  # psutil missing or the monitor cannot start: metrics are optional
                monitor = None
        try:
            yield
        finally:
            if monitor is not None:
                monitor.finish()

    def latest_model_version(self, name: str):
        """The newest version of registered model ``name`` (``None`` if it has none)."""
        try:
            versions = self.client.search_model_versions(f"name = '{name}'")
        except Exception:  # MlflowException: the model is not registered yet
            return None
        return max(versions, key=lambda v: int(v.version), default=None)

    def log_backbone(
        self, run_id: str, export_dir: str, metrics: dict[str, float], registered_name: str | None
    ) -> dict[str, Any]:
        """Log the exported backbone as an MLflow model (``torch.export`` / pt2) and register it."""
        import mlflow
        import torch

        from dinov2_core.models.checkpoint_io import load_backbone

        model = _features_module(load_backbone(export_dir)).eval()
        size = _input_size(export_dir)
        example = torch.rand(1, 3, size, size).numpy()
        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model,
                name="backbone",
                input_example=example,
                serialization_format="pt2",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                params={k: v for k, v in scrub({"export_dir": export_dir}).items()},
            )
        out: dict[str, Any] = {"model_uri": info.model_uri, "model_id": info.model_id}
        if registered_name:
            chatter = io.StringIO()  # MLflow prints "Successfully registered model ..." to stderr
            with contextlib.redirect_stderr(chatter):
                version = mlflow.register_model(
                    info.model_uri, registered_name, tags={k: str(v) for k, v in metrics.items()}
                )
            logging.getLogger("mlflow").info(chatter.getvalue().strip())
            out.update(registered_name=registered_name, registered_version=str(version.version))
        return out


def _features_module(backbone):
    """The backbone behind a one-tensor ``forward(images) -> CLS features``, which ``torch.export`` traces
    (the backbone's own ``forward(*args, **kwargs)`` does not match MLflow's input structure)."""
    import torch

    class BackboneFeatures(torch.nn.Module):
        def __init__(self, backbone: torch.nn.Module) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.backbone(images)

    return BackboneFeatures(backbone)


def _input_size(export_dir: str) -> int:
    """A valid square input side for the exported backbone (a multiple of its patch size)."""
    try:
        with open(os.path.join(export_dir, "model.json"), encoding="utf-8") as handle:
            spec = json.load(handle)
        kwargs = spec.get("kwargs", {})
        patch = int(kwargs.get("patch_size", 14))
        img = int(kwargs.get("img_size", patch * 4))
        return max(patch, (img // patch) * patch)
    except (OSError, ValueError):
        return 56


class MetricsForwarder:
    """Forwards rows appended to a trainer's ``metrics.jsonl`` (rank 0) to an MLflow run, stepwise.

    A resumed trainer truncates the file back to its checkpoint and rewrites the rows after it; the
    forwarder notices (the file shrank or no longer ends a line where it stopped), re-reads it and only
    forwards iterations it has not forwarded yet.
    """

    def __init__(self, tracker: Tracker | None, run_id: str | None, path: str) -> None:
        self.tracker = tracker
        self.run_id = run_id
        self.path = path
        self.offset = 0
        self.last: dict[str, Any] = {}
        self.last_iteration = -1
        self.rows = 0

    def _rewritten(self, handle) -> bool:
        handle.seek(0, os.SEEK_END)
        if handle.tell() < self.offset:
            return True
        if self.offset:
            handle.seek(self.offset - 1)
            return handle.read(1) != b"\n"
        return False

    def poll(self) -> list[dict[str, Any]]:
        """Forward complete new lines (a partially written last line is left for the next poll)."""
        try:
            with open(self.path, "rb") as handle:
                if self._rewritten(handle):
                    self.offset = 0
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        rows = []
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if int(row.get("iteration", self.last_iteration + 1)) > self.last_iteration:
                rows.append(row)
                self.last_iteration = int(row.get("iteration", self.last_iteration + 1))
        if rows and self.tracker and self.run_id:
            for row in rows:
                step = int(row.get("iteration", 0))
                self.tracker.log_metrics(self.run_id, {k: v for k, v in row.items() if k != "iteration"}, step=step)
        if rows:
            self.last = rows[-1]
            self.rows += len(rows)
        return rows


def compare_runs(
    tracking_uri: str, experiment: str, run_ids: list[str] | None = None, max_runs: int = 10,
    metric_filter: tuple[str, ...] = ("top1", "miou", "map"), baselines: bool = False,
    work_dirs: list[str] | None = None,
) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows of pipeline runs (parent runs): given ids, every run of the given run directories
    (their history: one parent run per pipeline run), or the latest runs of the experiment. Shows what
    each run recomputed, the params that differ between them and their metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = [client.get_run(r) for r in run_ids or []]
    for work_dir in work_dirs or []:
        if found is not None:
            runs += client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"],
                                       filter_string=f"tags.pipeline = 'dinov2' and tags.work_dir = '{work_dir}'",
                                       max_results=max_runs)
    if not run_ids and not work_dirs and found is not None:
        runs = client.search_runs([found.experiment_id], filter_string="tags.pipeline = 'dinov2'",
                                  order_by=["attributes.start_time DESC"], max_results=max_runs)
    keys = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1 and not k.endswith(("work_dir", ".name"))]
    metrics = sorted({
        k for r in runs for k in r.data.metrics
        if any(f in k for f in metric_filter) and (baselines or "baseline" not in k)
    })
    columns = ["run", "name", "status", "recomputed", *differing, *metrics]
    rows = []
    for r in runs:
        row = {"run": r.info.run_id[:8], "name": r.info.run_name or "", "status": r.info.status,
               "recomputed": r.data.tags.get("recomputed", "")}
        row.update({k: r.data.params.get(k, "") for k in differing})
        row.update({k: (f"{r.data.metrics[k]:.4g}" if k in r.data.metrics else "") for k in metrics})
        rows.append(row)
    return columns, rows
