"""``PipelineConfig``: the one typed tree that describes an end-to-end pipeline run.

A pipeline config names the raw images (``source``), the run directory (``work_dir``), one section per
stage and how heavy stages are dispatched (``launcher``) and tracked (``tracking``). Stage sections
reuse the stage's own config dataclass: curation sections hold the options of
``curation.config.<Stage>Config``; training sections point at a trainer recipe
(``configs/train/*.yaml``) plus ``key=value`` overrides; ``eval`` holds ``EvalConfig`` options.

This module is the schema only: it imports nothing from the wiring. ``tasks.wiring.load_pipeline_config``
parses a file with :func:`parse_pipeline_config` and then builds every stage config, so a typo anywhere
is reported, with the dotted key and the allowed values, before a single job is submitted.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dinov2_core.utils.config import ConfigError, apply_overrides, from_dict, load_yaml
from tasks.stage_table import HEAVY_STAGES, TRAIN_STAGES

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Resources:
    """Slurm resources of one job; ``None`` means "inherit from the launcher section"."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    timeout_min: int | None = None
    constraint: str | None = None
    additional: dict[str, Any] | None = None
    max_num_timeout: int | None = None
    signal_delay_s: int | None = None


@dataclass
class LauncherConfig:
    """Where heavy stages run. ``local``: a subprocess on this machine (submitit's LocalExecutor) or,
    with ``local_mode: inline``, in this process. ``slurm``: an sbatch job through submitit."""

    kind: Literal["local", "slurm"] = "local"
    local_mode: Literal["subprocess", "inline"] = "subprocess"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    mem_gb: float | None = None
    timeout_min: int = 60
    constraint: str | None = None
    additional: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    max_num_timeout: int = 3
    signal_delay_s: int = 90
    poll_interval_s: float = 2.0
    stages: dict[str, Resources] = field(default_factory=dict)

    def validate(self) -> None:
        for name in self.stages:
            if name not in HEAVY_STAGES:
                raise ConfigError(
                    f"launcher.stages.{name}: not a stage that runs through the launcher; allowed: {list(HEAVY_STAGES)}"
                )
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min"):
            if getattr(self, key) < 1:
                raise ConfigError(f"launcher.{key}: {getattr(self, key)} must be >= 1")
        if self.gpus_per_node < 0 or self.max_num_timeout < 0:
            raise ConfigError("launcher.gpus_per_node / launcher.max_num_timeout: must be >= 0")
        if self.poll_interval_s <= 0:
            raise ConfigError(f"launcher.poll_interval_s: {self.poll_interval_s} must be > 0")
        if self.kind == "local" and (self.nodes > 1 or any((r.nodes or 1) > 1 for r in self.stages.values())):
            raise ConfigError("launcher.nodes: the local launcher runs on one node only; allowed: 1 (or kind: slurm)")

    def resources_for(self, stage: str) -> Resources:
        """The launcher defaults with the stage's own overrides applied."""
        base = Resources(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Resources)})
        override = self.stages.get(stage)
        if override is None:
            return base
        values = {k: v for k, v in dataclasses.asdict(override).items() if v is not None}
        return dataclasses.replace(base, **values)

    def job_settings(self, stage: str) -> dict[str, Any]:
        """What a stage's job is launched with: this section without the per-stage table, and the stage's
        resolved resources (JSON-able, handed to the runner with the stage spec)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "stages"}
        resources = dataclasses.asdict(self.resources_for(stage))
        data["resources"] = {k: v for k, v in resources.items() if v is not None}
        return data

    def world_size(self, stage: str) -> int:
        resources = self.resources_for(stage)
        return (resources.nodes or 1) * (resources.tasks_per_node or 1)


@dataclass
class TrackingConfig:
    """MLflow. ``uri`` defaults to ``sqlite:///<work_dir>/mlflow.db`` (no server needed); with many
    Slurm jobs run one ``mlflow server`` and give its ``http://`` address here."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "dinov2-pipeline"
    log_model: bool = True
    registered_model_name: str | None = "dinov2-backbone"
    system_metrics: bool = True


@dataclass
class CurationStageConfig:
    """A curation stage: ``options`` are the keys of ``curation.config.<Stage>Config``."""

    enabled: bool = True
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainStageConfig:
    """A training phase: a trainer recipe plus ``key=value`` overrides (the pipeline adds the dataset,
    ``init_from`` and ``distill.teacher_path`` from upstream stages).

    ``init``: ``scratch`` trains the stage's model as its recipe says (for highres: from pretrain's
    result); ``previous`` warm-starts from this stage's own last finished result in the run directory
    (e.g. a weekly retraining that continues from last week's weights), which must exist."""

    enabled: bool = True
    config: str = ""
    overrides: list[str] = field(default_factory=list)
    init: Literal["scratch", "previous"] = "scratch"


@dataclass
class EvalStageConfig:
    """Frozen-feature evaluation: ``options`` are the keys of ``dinov2_core.eval.EvalConfig``.
    ``train_manifest`` / ``val_manifest`` are labelled manifests or ImageFolders. ``train_manifest``
    defaults to the deduplicated pool (dedup's manifest, else the ingested one); ``val_manifest`` (the
    test set) is required for evaluation, and when embed and dedup run the training pool is
    decontaminated against it. ``backbones`` lists the stages to evaluate."""

    enabled: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    train_manifest: str | None = None
    val_manifest: str | None = None
    backbones: list[Literal["pretrain", "highres", "distill"]] = field(default_factory=lambda: ["distill"])


@dataclass
class ReportStageConfig:
    enabled: bool = True


@dataclass
class PipelineConfig:
    """An end-to-end run: ``source`` → curated data → three training phases → evaluation → report."""

    source: str = ""
    work_dir: str = ""
    name: str = "dinov2"
    data_dir: str | None = None
    ingest: CurationStageConfig = field(default_factory=CurationStageConfig)
    embed: CurationStageConfig = field(default_factory=CurationStageConfig)
    dedup: CurationStageConfig = field(default_factory=CurationStageConfig)
    curate: CurationStageConfig = field(default_factory=CurationStageConfig)
    pretrain: TrainStageConfig = field(default_factory=TrainStageConfig)
    highres: TrainStageConfig = field(default_factory=TrainStageConfig)
    distill: TrainStageConfig = field(default_factory=TrainStageConfig)
    eval: EvalStageConfig = field(default_factory=EvalStageConfig)
    report: ReportStageConfig = field(default_factory=ReportStageConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        if not self.source:
            raise ConfigError("source: required; an image folder, s3:// prefix, manifest, file list or tar shards")
        if not self.work_dir:
            raise ConfigError("work_dir: required; a directory on a filesystem the flow and its jobs share")
        if "://" in self.work_dir:
            raise ConfigError(
                f"work_dir: {self.work_dir!r} must be a filesystem path shared by the flow and its jobs "
                "(checkpoints, Slurm logs, Prefect results live there); put curated data on object "
                "storage with data_dir: s3://..."
            )
        for stage in TRAIN_STAGES:
            section: TrainStageConfig = getattr(self, stage)
            if section.enabled and not section.config:
                raise ConfigError(f"{stage}.config: required when {stage}.enabled; a trainer recipe such as configs/train/tiny_{stage}.yaml")

    def enabled(self, stage: str) -> bool:
        return bool(getattr(self, stage).enabled)

    @property
    def mlflow_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{os.path.abspath(self.work_dir)}/mlflow.db"

    def stage_root(self, stage: str) -> str:
        """``<work_dir>/<stage>``: one directory per result identity below it (see ``tasks.record``)."""
        return os.path.join(os.path.abspath(self.work_dir), stage)

    def data_root(self, stage: str) -> str:
        """Where a curation stage's outputs go (``data_dir`` may be on object storage), per identity below."""
        from dinov2_core.utils.uri import join_uri

        return join_uri(self.data_dir, stage) if self.data_dir else self.stage_root(stage)


def resolve_path(path: str, base_dir: str | None) -> str:
    """A recipe path as written in a config: absolute, relative to the config file, or to the repo."""
    if os.path.isabs(path) or "://" in path:
        return path
    for base in (base_dir, os.getcwd(), str(REPO_ROOT)):
        if base and os.path.exists(os.path.join(base, path)):
            return os.path.abspath(os.path.join(base, path))
    return path


def parse_pipeline_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a pipeline YAML (``defaults:`` inheritance allowed) and apply overrides; checks the schema
    only (``tasks.wiring.load_pipeline_config`` also builds and checks every stage)."""
    data, origins = load_yaml(path, with_origins=True) if path else ({}, {})
    data = apply_overrides(data, list(overrides))
    cfg = from_dict(PipelineConfig, data)
    base_dir = os.path.dirname(os.path.abspath(path)) if path else None
    for stage in TRAIN_STAGES:
        section: TrainStageConfig = getattr(cfg, stage)
        if section.config:
            # a recipe path is relative to the file that wrote it (a ``defaults:`` parent, or this file);
            # an override on the command line is relative to the working directory or this file
            overridden = any(o.split("=", 1)[0].strip() == f"{stage}.config" for o in overrides)
            origin = None if overridden else origins.get(f"{stage}.config")
            section.config = resolve_path(section.config, origin or base_dir)
    cfg.work_dir = os.path.abspath(os.path.expanduser(cfg.work_dir)) if cfg.work_dir else cfg.work_dir
    if "://" not in cfg.source and cfg.source:
        cfg.source = os.path.abspath(os.path.expanduser(cfg.source))
    cfg.validate()
    return cfg
