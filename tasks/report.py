"""Prefect task for the final report: evaluation table, stage summary, model logging and registration.

Runs in the flow process. Writes ``report/report.md``, publishes it as a Prefect Markdown artifact and
to the MLflow parent run together with the evaluation metrics, and logs the evaluated backbone as an
MLflow model (``torch.export`` format) registered in the model registry with its metrics.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import task

from tasks import artifacts
from tasks.runner import RunContext, run_stage
from tasks.stage import StageSpec, task_options


@task(name="report", task_run_name="report", **task_options(retries=1))
def report(spec: StageSpec, run_context: RunContext) -> dict[str, Any]:
    result = run_stage(spec, run_context, target="tasks.report:execute")
    artifacts.markdown(run_context.run_name, "report", result["markdown"], "End-to-end pipeline report")
    return result


def evaluation_tables(results: dict[str, Any]) -> dict[str, str]:
    """One Markdown table per evaluated backbone (backbone, random-init and raw-pixel rows)."""
    from dinov2_core.eval.report import markdown_table

    evals = (results.get("eval") or {}).get("metrics") or {}
    tables = {}
    for name, metrics in evals.items():
        if isinstance(metrics, dict):
            ks = sorted({int(k.rsplit(".k", 1)[1]) for k in metrics if k.startswith("knn.top1.k")})
            tables[name] = markdown_table(metrics, ks or (10, 20, 100, 200), title=name)
    return tables


def stage_table(results: dict[str, Any]) -> str:
    lines = ["| stage | seconds | outputs |", "|---|---|---|"]
    for stage, result in results.items():
        where = (result.get("outputs") or {}).get("dir", "")
        lines.append(f"| {stage} | {result.get('seconds', '')} | {where} |")
    return "\n".join(lines) + "\n"


def execute(config: dict[str, Any], inputs: dict[str, Any], output_uri: str, stage_dir: str) -> dict[str, Any]:
    from dinov2_core.utils.atomic import atomic_write_text
    from tasks.tracking import Tracker

    results = inputs["results"]
    tables = evaluation_tables(results)
    text = [f"# Pipeline report: {config['run_name']}\n\n", "## Stages\n\n", stage_table(results), "\n"]
    for name, table in tables.items():
        text += [f"## Evaluation of the {name} backbone\n\n", table, "\n"]
    pca = [p for r in ((results.get("eval") or {}).get("outputs") or {}).values() if isinstance(r, dict)
           for p in r.get("pca_maps", [])]
    if pca:
        text += ["## PCA feature maps\n\n", *[f"- {p}\n" for p in pca], "\n"]
    markdown = "".join(text)
    report_path = os.path.join(output_uri, "report.md")
    atomic_write_text(report_path, markdown)

    tracking = config.get("tracking") or {}
    model: dict[str, Any] = {}
    parent = config.get("parent_run_id")
    if tracking.get("enabled") and tracking.get("uri") and parent:
        tracker = Tracker(tracking["uri"], tracking["experiment"])
        evals = (results.get("eval") or {}).get("metrics") or {}
        for name, metrics in evals.items():
            if isinstance(metrics, dict):
                tracker.log_metrics(parent, {f"{name}.{k}": v for k, v in metrics.items()})
        tracker.log_artifact(parent, report_path)
        final = _final_backbone(results)
        if tracking.get("log_model") and final:
            stage, export_dir = final
            model = tracker.log_backbone(
                parent, export_dir, evals.get(stage) or {}, tracking.get("registered_model_name")
            )
            model["stage"] = stage
    return {"outputs": {"dir": output_uri, "report": report_path}, "markdown": markdown, "model": model,
            "metrics": {}, "artifacts": []}


def _final_backbone(results: dict[str, Any]) -> tuple[str, str] | None:
    """The last training stage that ran: the model this pipeline delivers."""
    for stage in ("distill", "highres", "pretrain"):
        export_dir = ((results.get(stage) or {}).get("outputs") or {}).get("export_dir")
        if export_dir and os.path.isdir(export_dir):
            return stage, export_dir
    return None
