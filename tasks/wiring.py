"""From a ``PipelineConfig`` and upstream results to each stage's validated ``StageSpec``.

The pipeline wires stages together by URI: the trainer's ``train.dataset`` is the curated manifest,
``highres`` starts from the pretraining export (``init_from``), ``distill`` learns from the
high-resolution teacher (``distill.teacher_path``), evaluation reads the exported backbones. Those keys
are filled in here, from the typed results of the upstream stages. Before a run starts,
:func:`validate_pipeline` builds every stage with *placeholder* upstream results (the outputs they will
have) and checks that every path a stage will read exists, so a typo anywhere is reported, with the
dotted key and the allowed values, before a single job is submitted.

Decontamination: when the pipeline names an evaluation test set (``eval.val_manifest``) and runs embed
and dedup, embed also embeds the test images with the training pool's embedding config and dedup
receives them as ``eval_embeddings``, so no training image within ``decontam_threshold`` of a test
image reaches the curated manifest (see :func:`decontamination_set`).
"""

from __future__ import annotations

import os
import re
from typing import Any

from dinov2_core.utils.config import ConfigError, apply_overrides, from_dict, to_dict
from dinov2_core.utils.uri import join_uri
from tasks.config import PipelineConfig, parse_pipeline_config
from tasks.embed import eval_embedding_uris
from tasks.record import StageResult, StageSpec, current_record
from tasks.stage_table import CURATION_STAGES, STAGE_DEFS, STAGES, TRAIN_STAGES

CURATION_CONFIG_CLASSES = {
    "ingest": "IngestConfig",
    "embed": "EmbedConfig",
    "dedup": "DedupConfig",
    "curate": "CurateConfig",
}
MANIFEST_NAME = "manifest.parquet"
MANIFEST_STAGES = ("ingest", "dedup", "curate")
PENDING = "pending"


def load_pipeline_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                         check_inputs: bool = True) -> PipelineConfig:
    """Read a pipeline YAML, apply overrides and validate every stage (see :func:`validate_pipeline`);
    ``check_inputs=False`` leaves out what needs the data and the tracking server (a plan made elsewhere)."""
    cfg = parse_pipeline_config(path, overrides)
    validate_pipeline(cfg, check_inputs)
    return cfg


def resolve_config(
    config: PipelineConfig | dict | None = None, config_path: str | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """A fully validated config from a config object or dict, or from a YAML path plus overrides."""
    if config_path:
        return load_pipeline_config(config_path, overrides or [])
    if config is None:
        raise ConfigError("config: give a pipeline config or config_path (a YAML file)")
    data = to_dict(config) if not isinstance(config, dict) else config
    cfg = from_dict(PipelineConfig, apply_overrides(data, overrides or []))
    cfg.validate()
    validate_pipeline(cfg)
    return cfg


def validate_pipeline(cfg: PipelineConfig, check_inputs: bool = True) -> None:
    """Build every enabled stage against placeholder upstream results, check that the models handed
    from stage to stage fit each other, that the paths they read exist and that tracking is reachable."""
    cfg.validate()
    specs = {stage: build(cfg, stage, placeholders=True) for stage in enabled_stages(cfg)}
    check_model_handoffs(specs)
    if check_inputs:
        check_inputs_reachable(cfg, specs)


def check_inputs_reachable(cfg: PipelineConfig, specs: dict[str, StageSpec] | None = None) -> None:
    """The inputs exist and the tracking server answers (needs the data's storage and the network)."""
    specs = specs if specs is not None else {s: build(cfg, s, placeholders=True) for s in enabled_stages(cfg)}
    check_paths(cfg, specs)
    check_tracking(cfg)


def check_model_handoffs(specs: dict[str, StageSpec]) -> None:
    """``highres`` continues ``pretrain``'s model: the same architecture and patch size (a distillation
    student may differ from its teacher, but the teacher's patch size must be the student's)."""
    def model(stage: str) -> tuple[str, int]:
        student = specs[stage].config["student"]
        return student["arch"], int(student["patch_size"])

    if "pretrain" in specs and "highres" in specs and specs["highres"].config.get("init_from") == \
            specs["highres"].inputs.get("init_from") and model("pretrain") != model("highres"):
        raise ConfigError(f"highres.config: student {model('highres')} (arch, patch_size) must continue pretrain's "
                          f"student {model('pretrain')}; allowed: the same arch and patch_size")
    teacher = "highres" if "highres" in specs else "pretrain" if "pretrain" in specs else None
    if "distill" in specs and teacher and model(teacher)[1] != model("distill")[1]:
        raise ConfigError(f"distill.config: student.patch_size {model('distill')[1]} differs from the teacher's "
                          f"({teacher}: {model(teacher)[1]}); allowed: {model(teacher)[1]}")


def check_tracking(cfg: PipelineConfig, timeout_s: float = 5.0) -> None:
    """One short probe of an MLflow server, so an unreachable one fails now and not after minutes of retries."""
    uri = cfg.mlflow_uri
    if not cfg.tracking.enabled or not uri.startswith(("http://", "https://")):
        return
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    from dinov2_core.utils.redact import redact_text

    parts = urllib.parse.urlsplit(uri)
    request = urllib.request.Request(urllib.parse.urlunsplit(
        (parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else ""), parts.path.rstrip("/") + "/health", "", "")))
    if parts.username:  # user:password@ in the URI: MLflow's basic auth
        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        urllib.request.urlopen(request, timeout=timeout_s).close()
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ConfigError(f"tracking.uri: {redact_text(uri)} is not reachable ({err}); start the server "
                          "(infra/mlflow/up.sh) or leave tracking.uri unset for the local SQLite store") from err


def enabled_stages(cfg: PipelineConfig) -> list[str]:
    return [stage for stage in STAGES if cfg.enabled(stage)]


def check_paths(cfg: PipelineConfig, specs: dict[str, StageSpec]) -> None:
    """Every input from outside the pipeline exists now (not after an hour of training): the source, the
    eval sets, and checkpoints a recipe names itself (``init_from``, ``distill.teacher_path``)."""
    named = {"source": cfg.source}
    if cfg.enabled("eval") or decontamination_set(cfg):
        named["eval.val_manifest"] = cfg.eval.val_manifest or ""
        named["eval.train_manifest"] = cfg.eval.train_manifest or ""
    for stage, spec in specs.items():
        if spec.definition.kind == "train":
            for name in spec.external:
                value = spec.inputs.get(name)
                if name != "dataset" and isinstance(value, str) and os.sep + PENDING + os.sep not in value:
                    named[f"{stage} ({'distill.teacher_path' if name == 'teacher' else name})"] = value
    for key, uri in named.items():
        if uri:
            require_path(key, uri)


def require_path(key: str, uri: str) -> None:
    """``uri`` exists; else a ``ConfigError`` naming ``key`` (also when storage cannot be reached or refuses
    the credentials: the stage could not read it either)."""
    from dinov2_core.utils.redact import redact_text
    from dinov2_core.utils.uri import exists

    try:
        found = bool(exists(uri))
    except Exception as err:  # botocore's NoCredentialsError, EndpointConnectionError, PermissionError, ...
        raise ConfigError(f"{key}: {redact_text(uri)!r} cannot be checked: {type(err).__name__}: "
                          f"{redact_text(str(err))[:300]}") from err
    if not found:
        raise ConfigError(f"{key}: {redact_text(uri)!r} does not exist (or is not readable with the current credentials)")


def curation_config(cfg: PipelineConfig, stage: str):
    """``curation.config.<Stage>Config`` built from ``<stage>.options`` (errors name ``<stage>.options.<key>``)."""
    import curation.config as module

    cls = getattr(module, CURATION_CONFIG_CLASSES[stage])
    prefix = f"{stage}.options"
    try:
        return from_dict(cls, getattr(cfg, stage).options, prefix=prefix)
    except ConfigError as err:
        if str(err).startswith(prefix):
            raise
        raise ConfigError(f"{prefix}.{err}") from err


def placeholder_result(cfg: PipelineConfig, stage: str) -> StageResult:
    """The result a stage will have, with outputs under a ``pending`` identity (validation only)."""
    root = cfg.data_root(stage) if stage in CURATION_STAGES else cfg.stage_root(stage)
    out = join_uri(root, PENDING)
    outputs: dict[str, Any] = {"dir": out}
    if stage in MANIFEST_STAGES:
        outputs["manifest"] = join_uri(out, MANIFEST_NAME)
    if stage == "embed":
        outputs["embeddings"] = out
        if decontamination_set(cfg):
            outputs["eval_manifest"], outputs["eval_embeddings"] = eval_embedding_uris(out)
    if stage in TRAIN_STAGES:
        outputs["export_dir"] = os.path.join(out, "export")
    return StageResult(stage=stage, identity=PENDING, outputs=outputs)


def decontamination_set(cfg: PipelineConfig) -> str | None:
    """The evaluation images the training pool is decontaminated against, or ``None``.

    That is the eval *test* set (``eval.val_manifest``, also when the eval stage itself is disabled:
    the images are still named as evaluation data). The kNN/linear *train* set is not: it is labelled
    training data (DINOv2 pretrains on ImageNet-1k train too), and by default it is the training pool
    itself. Decontamination needs embed and dedup; with either disabled the source is taken as curated.
    """
    if not (cfg.enabled("embed") and cfg.enabled("dedup")):
        return None
    return cfg.eval.val_manifest or None


def decontamination_list_uri(cfg: PipelineConfig, test_set: str) -> str:
    """Where dedup writes the decontamination list (``DedupConfig.decontam_list_uri``).

    Next to the eval manifest (``<stem>.decontamination-<run name>.parquet``, one per run name so runs
    sharing a test set do not overwrite each other's list) when that manifest is a local file in a
    writable directory outside the training source (writing into the source would change its listing
    and re-ingest it); otherwise (ImageFolder, object storage, read-only) dedup's own
    ``decontamination.parquet`` in the stage's output directory (``None`` here: dedup's default).
    """
    from dinov2_core.data.manifest import MANIFEST_SUFFIXES
    from dinov2_core.utils.uri import is_remote

    suffix = next((s for s in MANIFEST_SUFFIXES if test_set.lower().endswith(s)), None)
    if suffix is None or is_remote(test_set):
        return ""
    directory = os.path.dirname(os.path.abspath(test_set))
    if not os.access(directory, os.W_OK):
        return ""
    if not is_remote(cfg.source):
        source = os.path.abspath(cfg.source)
        if directory == source or directory.startswith(source.rstrip(os.sep) + os.sep):
            return ""
    stem = os.path.basename(test_set)[: -len(suffix)]
    run = re.sub(r"[^A-Za-z0-9._-]", "_", cfg.name)
    return os.path.join(directory, f"{stem}.decontamination-{run}.parquet")


class _Upstream:
    """Upstream results as a stage being built sees them: real ones, or placeholders during validation."""

    def __init__(self, cfg: PipelineConfig, results: dict[str, StageResult], placeholders: bool) -> None:
        self.cfg = cfg
        self.results = results
        self.placeholders = placeholders
        self.used: dict[str, dict[str, Any]] = {}

    def get(self, stage: str) -> StageResult:
        result = self.results.get(stage)
        if result is None:
            if not self.placeholders:
                raise ConfigError(f"{stage}: has no finished result in {self.cfg.work_dir}; run it first "
                                  f"(or set {stage}.enabled=false)")
            result = placeholder_result(self.cfg, stage)
        self.used[stage] = result.reference()
        return result

    def nearest(self, candidates: tuple[str, ...]) -> StageResult | None:
        """The last enabled stage among ``candidates`` (pipeline order)."""
        for stage in reversed(candidates):
            if self.cfg.enabled(stage):
                return self.get(stage)
        return None

    def manifest(self, reader: str) -> tuple[str, bool]:
        """``(manifest URI, from upstream)``: the nearest enabled manifest-producing stage before ``reader``."""
        producers = tuple(s for s in STAGE_DEFS[reader].upstream if s in MANIFEST_STAGES)
        found = self.nearest(producers)
        return (found.output("manifest"), True) if found else (self.cfg.source, False)


def build(cfg: PipelineConfig, stage: str, results: dict[str, StageResult] | None = None,
          placeholders: bool = False, run: dict[str, Any] | None = None) -> StageSpec:
    """The ``StageSpec`` of ``stage`` given the finished upstream ``results`` (placeholders when validating)."""
    upstream = _Upstream(cfg, dict(results or {}), placeholders)
    root = cfg.stage_root(stage)
    common = {"stage_root": root, "launcher": cfg.launcher.job_settings(stage),
              "world_size": cfg.launcher.world_size(stage), "run": dict(run or {})}
    kind = STAGE_DEFS[stage].kind
    if kind == "curation":
        spec = _curation_spec(cfg, stage, upstream, placeholders, common)
    elif kind == "train":
        spec = _train_spec(cfg, stage, upstream, placeholders, common)
    elif kind == "eval":
        spec = _eval_spec(cfg, upstream, common)
    else:
        spec = _report_spec(cfg, upstream, common)
    spec.upstream = upstream.used
    return spec


def _curation_spec(cfg: PipelineConfig, stage: str, upstream: _Upstream, placeholders: bool,
                   common: dict[str, Any]) -> StageSpec:
    stage_cfg = curation_config(cfg, stage)
    if stage == "curate" and stage_cfg.mode != "balanced":
        raise ConfigError(
            f"curate.options.mode: {stage_cfg.mode!r} needs seed-set embeddings, which this pipeline does not "
            "produce; allowed here: 'balanced' (run curation.curate.run_curate directly for retrieval modes)"
        )
    config = to_dict(stage_cfg)
    inputs: dict[str, Any] = {}
    external: list[str] = []
    if stage == "ingest":
        inputs["source"] = cfg.source
        external.append("source")
    else:
        inputs["manifest"], from_upstream = upstream.manifest(stage)
        if not from_upstream:
            external.append("manifest")
    if stage in ("dedup", "curate"):
        if not cfg.enabled("embed"):
            raise ConfigError(f"embed.enabled: {stage} needs embeddings; allowed: true (or disable {stage})")
        inputs["embeddings"] = upstream.get("embed").output("embeddings")
    test_set = decontamination_set(cfg)
    if test_set and stage == "embed":
        inputs["eval_images"] = test_set
        external.append("eval_images")
    if test_set and stage == "dedup":
        embed = upstream.get("embed")
        if "eval_embeddings" not in embed.outputs:  # an embed result recorded before the test set was named
            raise ConfigError(f"eval.val_manifest: embed in {cfg.work_dir} finished without the test set "
                              f"{test_set!r}; rerun embed so dedup can decontaminate against it")
        inputs["eval_embeddings"] = embed.output("eval_embeddings")
        if not stage_cfg.decontam_list_uri:
            config["decontam_list_uri"] = decontamination_list_uri(cfg, test_set) or None
    return StageSpec(stage, config, data_root=cfg.data_root(stage), inputs=inputs, external=tuple(external), **common)


def _train_spec(cfg: PipelineConfig, stage: str, upstream: _Upstream, placeholders: bool,
                common: dict[str, Any]) -> StageSpec:
    from dinov2_core.train.config import load_train_config

    section = getattr(cfg, stage)
    manifest, from_upstream = upstream.manifest(stage)
    wiring = [f"train.dataset={manifest}"]
    inputs: dict[str, Any] = {"dataset": manifest}
    external = [] if from_upstream else ["dataset"]
    if stage == "highres" and cfg.enabled("pretrain"):
        inputs["init_from"] = upstream.get("pretrain").output("export_dir")
    if stage == "distill":
        teacher = upstream.nearest(("pretrain", "highres"))
        if teacher is not None:
            inputs["teacher"] = teacher.output("export_dir")
    if section.init == "previous":
        inputs["init_from"] = previous_export(cfg, stage)
        external.append("init_from")
    if "init_from" in inputs:
        wiring.append(f"init_from={inputs['init_from']}")
    if "teacher" in inputs:
        wiring.append(f"distill.teacher_path={inputs['teacher']}")
    try:
        train_cfg = load_train_config(section.config, [*wiring, *section.overrides])
    except ConfigError as err:
        raise ConfigError(f"{stage} (recipe {section.config}): {err}") from err
    if train_cfg.phase != stage:
        raise ConfigError(f"{stage}.config: recipe {section.config} has phase {train_cfg.phase!r}; allowed: {stage!r}")
    # checkpoints named by the recipe itself (no upstream stage provides them) are external inputs
    if train_cfg.init_from and "init_from" not in inputs:
        inputs["init_from"] = train_cfg.init_from
        external.append("init_from")
    if train_cfg.phase == "distill" and "teacher" not in inputs:
        inputs["teacher"] = train_cfg.distill.teacher_path
        external.append("teacher")
    return StageSpec(stage, to_dict(train_cfg), data_root=common["stage_root"], inputs=inputs,
                     external=tuple(external), **common)


def previous_export(cfg: PipelineConfig, stage: str) -> str:
    """The export of ``stage``'s last finished result in this run directory (``<stage>.init: previous``)."""
    record = current_record(cfg.stage_root(stage))
    if record is None:
        raise ConfigError(f"{stage}.init: 'previous' needs a finished {stage} result in {cfg.work_dir}; "
                          "allowed: 'scratch' for the first run")
    return StageResult.from_dict(record["result"]).output("export_dir")


def _eval_spec(cfg: PipelineConfig, upstream: _Upstream, common: dict[str, Any]) -> StageSpec:
    backbones = {}
    for stage in cfg.eval.backbones:
        if not cfg.enabled(stage):
            raise ConfigError(f"eval.backbones: {stage!r} is disabled; allowed: enabled training stages "
                              f"{[s for s in TRAIN_STAGES if cfg.enabled(s)]}")
        backbones[stage] = upstream.get(stage).output("export_dir")
    if not cfg.eval.val_manifest:
        raise ConfigError("eval.val_manifest: required; a labelled manifest or ImageFolder of held-out images")
    external = ["test"]
    train = cfg.eval.train_manifest
    if train:
        external.append("train")
    else:
        if not cfg.enabled("ingest"):
            raise ConfigError("eval.train_manifest: required when ingest is disabled (a labelled manifest or ImageFolder)")
        # the deduplicated pool: a copy of a test image in the kNN/linear train set would inflate the scores
        train = upstream.nearest(("ingest", "dedup")).output("manifest")
    inputs = {"backbones": backbones, "train": train, "test": cfg.eval.val_manifest}
    config = {"evals": eval_configs(cfg, inputs)}
    return StageSpec("eval", config, data_root=common["stage_root"], inputs=inputs, external=tuple(external), **common)


def eval_configs(cfg: PipelineConfig, inputs: dict[str, Any]) -> dict[str, Any]:
    """One validated ``EvalConfig`` per backbone (as dicts)."""
    from dinov2_core.eval.config import EvalConfig

    out = {}
    for stage, export_dir in inputs["backbones"].items():
        data = dict(cfg.eval.options, backbone=export_dir, train=inputs["train"], test=inputs["test"])
        out[stage] = to_dict(from_dict(EvalConfig, data, prefix="eval.options"))
    return out


def _report_spec(cfg: PipelineConfig, upstream: _Upstream, common: dict[str, Any]) -> StageSpec:
    results = {stage: result.to_dict() for stage, result in upstream.results.items() if stage != "report"}
    config = {"run_name": cfg.name, "work_dir": cfg.work_dir,
              "tracking": dict(to_dict(cfg.tracking), uri=cfg.mlflow_uri)}
    return StageSpec("report", config, data_root=common["stage_root"], inputs={"results": results}, **common)


def build_checkpoint_eval(cfg: PipelineConfig, backbone: str) -> StageSpec:
    """An ``eval`` spec for one given backbone (export directory or official ``.pth``)."""
    inputs = {"backbones": {"checkpoint": backbone}, "train": cfg.eval.train_manifest, "test": cfg.eval.val_manifest}
    return StageSpec("eval", {"evals": eval_configs(cfg, inputs)}, stage_root=cfg.stage_root("eval"),
                     data_root=cfg.stage_root("eval"), inputs={**inputs, "backbone": backbone},
                     external=("backbone", "train", "test"), launcher=cfg.launcher.job_settings("eval"))


def plan_stages(cfg: PipelineConfig) -> dict[str, str]:
    """``run --dry-run``: per enabled stage, how it would be launched and, for training stages, the plan
    (world size, global batch, lr, parameters, memory per GPU, checkpoints, time limit vs schedule)."""
    from dinov2_core.train.config import TrainConfig
    from dinov2_core.train.meta_arch import backbone_kwargs
    from dinov2_core.train.plan import plan_training
    from tasks.launch import slurm_partition_max_time_min

    plans: dict[str, str] = {}
    train_cfgs: dict[str, TrainConfig] = {}
    for stage in enabled_stages(cfg):
        definition = STAGE_DEFS[stage]
        resources = cfg.launcher.resources_for(stage)
        text = (f"{cfg.launcher.kind} job: {resources.nodes} node(s) x {resources.tasks_per_node} task(s), "
                f"{resources.gpus_per_node or 0} GPU(s)/node, time limit {resources.timeout_min} min"
                if definition.heavy else "in the flow process")
        if definition.kind == "train":
            train_cfg = from_dict(TrainConfig, build(cfg, stage, placeholders=True).config)
            train_cfgs[stage] = train_cfg
            teacher = next((train_cfgs[s] for s in ("highres", "pretrain") if s in train_cfgs), None)
            teacher_spec = ({"arch": teacher.student.arch, "kwargs": backbone_kwargs(teacher, drop_path=False)}
                            if stage == "distill" and teacher is not None else None)
            plan = plan_training(
                train_cfg, nodes=resources.nodes or 1, tasks_per_node=resources.tasks_per_node or 1,
                gpus_per_node=resources.gpus_per_node or 0, timeout_min=resources.timeout_min,
                max_requeues=resources.max_num_timeout, teacher_spec=teacher_spec,
                partition_max_time_min=slurm_partition_max_time_min(resources.partition)
                if cfg.launcher.kind == "slurm" else None,
            )
            text += "\n" + plan.render()
        plans[stage] = text
    return plans
