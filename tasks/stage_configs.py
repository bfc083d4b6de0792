"""From a ``PipelineConfig`` and upstream results to each stage's own validated config and spec.

The pipeline wires stages together by URI: the trainer's ``train.dataset`` is the curated manifest,
``highres`` starts from the pretraining output (``init_from``), ``distill`` learns from the
high-resolution teacher (``distill.teacher_path``), evaluation reads the exported backbones. Those
keys are filled in here; with ``placeholders=True`` they get the URIs the upstream stages *will*
produce, so every stage config can be built and validated before anything runs.

Decontamination: when the pipeline names an evaluation test set (``eval.val_manifest``) and runs embed
and dedup, embed also embeds the test images with the training pool's embedding config and dedup
receives them as ``eval_embeddings``, so no training image within ``decontam_threshold`` of a test
image reaches the curated manifest (see :func:`decontamination_set`).
"""

from __future__ import annotations

import os
import re
from typing import Any

from dinov2_core.utils.config import ConfigError, from_dict, to_dict
from tasks.config import CURATION_STAGES, PipelineConfig, TRAIN_STAGES
from tasks.runner import launcher_section
from tasks.stage import StageSpec

CURATION_CONFIG_CLASSES = {
    "ingest": "IngestConfig",
    "embed": "EmbedConfig",
    "dedup": "DedupConfig",
    "curate": "CurateConfig",
}
MANIFEST_NAME = "manifest.parquet"
DECONTAM_NAME = "decontamination.parquet"
EVAL_IMAGES_DIR = "eval"  # under embed's output: the test set's manifest and, in ``embeddings/``, its shards


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


def predicted_output(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The outputs a stage will have (used as placeholders during validation)."""
    if stage in CURATION_STAGES:
        out = cfg.data_uri(stage)
        outputs: dict[str, Any] = {"dir": out, "manifest": _join(out, MANIFEST_NAME)}
        if stage == "embed":
            outputs = {"dir": out, "embeddings": out}
            if decontamination_set(cfg):
                outputs["eval_manifest"], outputs["eval_embeddings"] = eval_embedding_uris(out)
        return {"outputs": outputs, "input_hash": "pending"}
    if stage in TRAIN_STAGES:
        return {"outputs": {"dir": cfg.stage_dir(stage), "export_dir": os.path.join(cfg.stage_dir(stage), "export")},
                "input_hash": "pending"}
    return {"outputs": {"dir": cfg.stage_dir(stage)}, "input_hash": "pending"}


def _join(base: str, name: str) -> str:
    from dinov2_core.utils.uri import join_uri

    return join_uri(base, name)


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


def eval_embedding_uris(embed_output: str) -> tuple[str, str]:
    """``(manifest, embeddings)`` URIs of the eval test set under the embed stage's output."""
    base = _join(embed_output, EVAL_IMAGES_DIR)
    return _join(base, MANIFEST_NAME), _join(base, "embeddings")


def decontamination_list_uri(cfg: PipelineConfig, test_set: str) -> str:
    """Where dedup writes the decontamination list (``DedupConfig.decontam_list_uri``).

    Next to the eval manifest (``<stem>.decontamination-<run name>.parquet``, one per run name so runs
    sharing a test set do not overwrite each other's list) when that manifest is a local file in a
    writable directory outside the training source (writing into the source would change its listing
    and re-ingest it); otherwise (ImageFolder, object storage, read-only) dedup's own
    ``decontamination.parquet``.
    """
    from dinov2_core.data.manifest import MANIFEST_SUFFIXES
    from dinov2_core.utils.uri import is_remote

    own = _join(cfg.data_uri("dedup"), DECONTAM_NAME)
    suffix = next((s for s in MANIFEST_SUFFIXES if test_set.lower().endswith(s)), None)
    if suffix is None or is_remote(test_set):
        return own
    directory = os.path.dirname(os.path.abspath(test_set))
    if not os.access(directory, os.W_OK):
        return own
    if not is_remote(cfg.source):
        source = os.path.abspath(cfg.source)
        if directory == source or directory.startswith(source.rstrip(os.sep) + os.sep):
            return own
    stem = os.path.basename(test_set)[: -len(suffix)]
    run = re.sub(r"[^A-Za-z0-9._-]", "_", cfg.name)
    return os.path.join(directory, f"{stem}.decontamination-{run}.parquet")


def _listing(key: str, uri: str) -> str:
    """``listing_digest(uri)``; a missing input is a configuration error naming ``key``."""
    from curation.sources import listing_digest

    try:
        return listing_digest(uri)
    except FileNotFoundError as err:
        raise ConfigError(f"{key}: {uri!r} not found ({err})") from err


def upstream_manifest(cfg: PipelineConfig, results: dict[str, dict], before: str) -> tuple[str, dict]:
    """The manifest the stage ``before`` reads: from the last enabled manifest-producing stage, else ``source``."""
    order = ("ingest", "dedup", "curate")
    limit = {"embed": 1, "dedup": 1, "curate": 2}.get(before, 3)
    for stage in reversed(order[:limit]):
        if cfg.enabled(stage):
            result = results.get(stage) or predicted_output(cfg, stage)
            return result["outputs"]["manifest"], {stage: result.get("input_hash")}
    return cfg.source, {"source": cfg.source}


def _train_inputs(cfg: PipelineConfig, stage: str, results: dict[str, dict]) -> tuple[list[str], dict[str, Any]]:
    manifest, provenance = upstream_manifest(cfg, results, stage)
    overrides = [f"train.dataset={manifest}"]
    inputs: dict[str, Any] = {"dataset": manifest, "upstream": provenance}
    if stage == "highres":
        if not cfg.enabled("pretrain"):
            return overrides, inputs  # the recipe's own init_from is used
        pre = results.get("pretrain") or predicted_output(cfg, "pretrain")
        overrides.append(f"init_from={pre['outputs']['export_dir']}")
        inputs["init_from"] = pre["outputs"]["export_dir"]
        inputs["upstream"]["pretrain"] = pre.get("input_hash")
    if stage == "distill":
        teacher_stage = "highres" if cfg.enabled("highres") else "pretrain" if cfg.enabled("pretrain") else None
        if teacher_stage:
            teacher = results.get(teacher_stage) or predicted_output(cfg, teacher_stage)
            overrides.append(f"distill.teacher_path={teacher['outputs']['export_dir']}")
            inputs["teacher"] = teacher["outputs"]["export_dir"]
            inputs["upstream"][teacher_stage] = teacher.get("input_hash")
    return overrides, inputs


def train_config(cfg: PipelineConfig, stage: str, results: dict[str, dict]):
    """The resolved ``TrainConfig`` of a training stage (recipe + user overrides + pipeline wiring)."""
    from dinov2_core.train.config import load_train_config

    section = getattr(cfg, stage)
    wiring, _ = _train_inputs(cfg, stage, results)
    try:
        train_cfg = load_train_config(section.config, [*wiring, *section.overrides])
    except ConfigError as err:
        raise ConfigError(f"{stage} (recipe {section.config}): {err}") from err
    if train_cfg.phase != stage:
        raise ConfigError(f"{stage}.config: recipe {section.config} has phase {train_cfg.phase!r}; allowed: {stage!r}")
    return train_cfg


def eval_inputs(cfg: PipelineConfig, results: dict[str, dict]) -> dict[str, Any]:
    backbones = {}
    provenance = {}
    for stage in cfg.eval.backbones:
        if not cfg.enabled(stage):
            raise ConfigError(f"eval.backbones: {stage!r} is disabled; allowed: enabled training stages "
                              f"{[s for s in TRAIN_STAGES if cfg.enabled(s)]}")
        result = results.get(stage) or predicted_output(cfg, stage)
        backbones[stage] = result["outputs"]["export_dir"]
        provenance[stage] = result.get("input_hash")
    train = cfg.eval.train_manifest
    if not train:
        if not cfg.enabled("ingest"):
            raise ConfigError("eval.train_manifest: required when ingest is disabled (a labelled manifest or ImageFolder)")
        # the deduplicated pool: a copy of a test image in the kNN/linear train set would inflate the scores
        pool = "dedup" if cfg.enabled("dedup") else "ingest"
        result = results.get(pool) or predicted_output(cfg, pool)
        train = result["outputs"]["manifest"]
        provenance[pool] = result.get("input_hash")
    if not cfg.eval.val_manifest:
        raise ConfigError("eval.val_manifest: required; a labelled manifest or ImageFolder of held-out images")
    return {"backbones": backbones, "train": train, "test": cfg.eval.val_manifest, "upstream": provenance}


def eval_configs(cfg: PipelineConfig, inputs: dict[str, Any]) -> dict[str, Any]:
    """One validated ``EvalConfig`` per backbone (as dicts)."""
    from dinov2_core.eval.config import EvalConfig

    out = {}
    for stage, export_dir in inputs["backbones"].items():
        data = dict(cfg.eval.options, backbone=export_dir, train=inputs["train"], test=inputs["test"])
        out[stage] = to_dict(from_dict(EvalConfig, data, prefix="eval.options"))
    return out


def build(cfg: PipelineConfig, stage: str, results: dict[str, dict] | None = None, placeholders: bool = False) -> StageSpec:
    """The ``StageSpec`` of ``stage`` given upstream ``results`` (predicted ones when ``placeholders``)."""
    results = {} if placeholders else dict(results or {})
    stage_dir = cfg.stage_dir(stage)
    launcher = launcher_section(cfg.launcher, stage)
    if stage in CURATION_STAGES:
        stage_cfg = curation_config(cfg, stage)
        if stage == "curate" and stage_cfg.mode != "balanced":
            raise ConfigError(
                f"curate.options.mode: {stage_cfg.mode!r} needs seed-set embeddings, which this pipeline does not "
                "produce; allowed here: 'balanced' (run curation.curate.run_curate directly for retrieval modes)"
            )
        config = to_dict(stage_cfg)
        inputs: dict[str, Any] = {}
        if stage == "ingest":
            inputs = {"source": cfg.source}
            if not placeholders:
                # new or replaced images under the same source URI make ingest (and all after it) rerun
                from curation.sources import listing_digest

                inputs["listing"] = listing_digest(cfg.source)
        else:
            manifest, provenance = upstream_manifest(cfg, results, stage)
            inputs = {"manifest": manifest, "upstream": provenance}
            if stage in ("dedup", "curate"):
                if not cfg.enabled("embed"):
                    raise ConfigError(f"embed.enabled: {stage} needs embeddings; allowed: true (or disable {stage})")
                emb = results.get("embed") or predicted_output(cfg, "embed")
                inputs["embeddings"] = emb["outputs"]["embeddings"]
                inputs["upstream"]["embed"] = emb.get("input_hash")
            test_set = decontamination_set(cfg)
            if test_set and stage == "embed":
                inputs["eval_images"] = test_set
                if not placeholders:
                    # replaced test images under the same URI must re-embed them (and rerun dedup after it)
                    inputs["eval_listing"] = _listing("eval.val_manifest", test_set)
            if test_set and stage == "dedup":
                inputs["eval_images"] = test_set
                inputs["eval_embeddings"] = emb["outputs"].get("eval_embeddings")
                if not inputs["eval_embeddings"]:  # an embed result recorded before the test set was named
                    raise ConfigError(f"eval.val_manifest: embed in {cfg.work_dir} finished without the test set "
                                      f"{test_set!r}; rerun embed so dedup can decontaminate against it")
                if not stage_cfg.decontam_list_uri:
                    config["decontam_list_uri"] = decontamination_list_uri(cfg, test_set)
        return StageSpec(stage, stage_dir, config, inputs, cfg.data_uri(stage), launcher)
    if stage in TRAIN_STAGES:
        train_cfg = train_config(cfg, stage, results)
        _, inputs = _train_inputs(cfg, stage, results)
        return StageSpec(stage, stage_dir, to_dict(train_cfg), inputs, stage_dir, launcher)
    if stage == "eval":
        inputs = eval_inputs(cfg, results)
        return StageSpec(stage, stage_dir, {"evals": eval_configs(cfg, inputs)}, inputs, stage_dir, launcher)
    if stage == "report":
        inputs = {"results": {k: v for k, v in results.items() if k != "report"}}
        config = {"run_name": cfg.name, "tracking": dict(to_dict(cfg.tracking), uri=cfg.mlflow_uri)}
        return StageSpec(stage, stage_dir, config, inputs, stage_dir, {})
    raise ConfigError(f"stage: {stage!r} is not one of {list(CURATION_CONFIG_CLASSES) + list(TRAIN_STAGES) + ['eval', 'report']}")


def build_checkpoint_eval(cfg: PipelineConfig, backbone: str) -> StageSpec:
    """An ``eval`` spec for one given backbone (export directory or official ``.pth``)."""
    inputs = {"backbones": {"checkpoint": backbone}, "train": cfg.eval.train_manifest,
              "test": cfg.eval.val_manifest, "upstream": {}}
    return StageSpec("eval", cfg.stage_dir("eval"), {"evals": eval_configs(cfg, inputs)}, inputs,
                     cfg.stage_dir("eval"), launcher_section(cfg.launcher, "eval"))
