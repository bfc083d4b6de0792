"""The stage table: every pipeline stage declared once, in pipeline order.

Everything that needs to know about stages reads this table: the config schema (one section per
stage), the wiring (which upstream outputs a stage reads), the runner (in the flow process or through
the launcher, distributed or not), the flows (the order), the CLI (``status``) and the identity of a
stage result (``version``). The table imports nothing, so both the flow side and the job side (a
Slurm node unpickling a job) can read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

StageKind = Literal["curation", "train", "eval", "report"]


@dataclass(frozen=True)
class StageDef:
    """One stage of the pipeline.

    ``upstream``: the stages whose outputs it reads (the nearest *enabled* one is used, e.g. pretrain
    reads curate's manifest, or dedup's when curate is disabled). ``job``: the ``module:function`` the
    job runs. ``heavy``: dispatched through the launcher (a local subprocess or a Slurm job) instead of
    running in the flow process. ``distributed``: every task of its job joins one ``torch.distributed``
    process group. ``version``: part of the stage's result identity; bump it when a code change alters
    what the stage produces from the same inputs, so finished results of the old code are recomputed.
    ``always_run``: never reused (the report, which writes into the current run's MLflow parent).
    """

    name: str
    kind: StageKind
    job: str
    upstream: tuple[str, ...] = ()
    heavy: bool = False
    distributed: bool = False
    version: int = 1
    always_run: bool = False


STAGE_TABLE: tuple[StageDef, ...] = (
    StageDef("ingest", "curation", "tasks.ingest:execute"),
    StageDef("embed", "curation", "tasks.embed:execute", upstream=("ingest",), heavy=True),
    StageDef("dedup", "curation", "tasks.dedup:execute", upstream=("ingest", "embed")),
    StageDef("curate", "curation", "tasks.curate:execute", upstream=("ingest", "embed", "dedup")),
    StageDef("pretrain", "train", "tasks.training:execute", upstream=("ingest", "dedup", "curate"),
             heavy=True, distributed=True),
    StageDef("highres", "train", "tasks.training:execute", upstream=("ingest", "dedup", "curate", "pretrain"),
             heavy=True, distributed=True),
    StageDef("distill", "train", "tasks.training:execute",
             upstream=("ingest", "dedup", "curate", "pretrain", "highres"), heavy=True, distributed=True),
    StageDef("eval", "eval", "tasks.eval:execute", upstream=("ingest", "dedup", "pretrain", "highres", "distill"),
             heavy=True),
    StageDef("report", "report", "tasks.report:execute", upstream=("eval",), always_run=True),
)

STAGE_DEFS: dict[str, StageDef] = {stage.name: stage for stage in STAGE_TABLE}
STAGES: tuple[str, ...] = tuple(STAGE_DEFS)
CURATION_STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_TABLE if s.kind == "curation")
TRAIN_STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_TABLE if s.kind == "train")
HEAVY_STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_TABLE if s.heavy)
