"""Job of the final report: stage table (reused / recomputed and why), evaluation tables, the MLflow
parent run's key metrics, and model logging and registration.

Runs in the flow process, every run (it writes into this run's MLflow parent). Writes ``report.md``,
publishes it as a Prefect Markdown artifact and to the MLflow parent run, logs the parent's key metrics
(kNN top-1 per evaluated backbone, final losses and images/s per training stage) so the runs table can
show them as columns, and logs the delivered backbone as an MLflow model (``torch.export`` format)
registered with its metrics — a new model version only when the weights differ from the latest one.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from tasks.record import StageResult

WEIGHTS_TAG = "weights_sha256"
KEY_TRAIN_METRICS = ("total_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss", "images_per_s")


def evaluation_tables(results: dict[str, StageResult]) -> dict[str, str]:
    """One Markdown table per evaluated backbone (backbone, random-init and raw-pixel rows)."""
    from dinov2_core.eval.report import markdown_table

    evaluation = results.get("eval")
    tables = {}
    for name, metrics in (evaluation.metrics if evaluation else {}).items():
        if isinstance(metrics, dict):
            ks = sorted({int(k.rsplit(".k", 1)[1]) for k in metrics if k.startswith("knn.top1.k")})
            tables[name] = markdown_table(metrics, ks or (10, 20, 100, 200), title=name)
    return tables


def stage_table(results: dict[str, StageResult]) -> str:
    lines = ["| stage | outcome | why | seconds | identity | outputs |", "|---|---|---|---|---|---|"]
    for stage, result in results.items():
        lines.append(f"| {stage} | {result.outcome} | {result.reason} | {result.seconds:g} | "
                     f"`{result.identity[:16]}` | {result.outputs.get('dir', '')} |")
    return "\n".join(lines) + "\n"


def key_metrics(results: dict[str, StageResult]) -> dict[str, float]:
    """The parent run's headline numbers: kNN top-1 per backbone, final losses and speed per training stage."""
    out: dict[str, float] = {}
    evaluation = results.get("eval")
    for name, metrics in (evaluation.metrics if evaluation else {}).items():
        if isinstance(metrics, dict):
            out.update({f"{name}.{key}": value for key, value in metrics.items() if isinstance(value, (int, float))})
    for stage in ("pretrain", "highres", "distill"):
        result = results.get(stage)
        if result is None:
            continue
        for key in KEY_TRAIN_METRICS:
            value = result.metrics.get(f"final.{key}")
            if isinstance(value, (int, float)):
                out[f"{stage}.final.{key}"] = value
    return out


def pca_figures(results: dict[str, StageResult]) -> list[str]:
    evaluation = results.get("eval")
    outputs = evaluation.outputs if evaluation else {}
    return [p for value in outputs.values() if isinstance(value, dict) for p in value.get("pca_maps", [])]


def execute(config: dict[str, Any], inputs: dict[str, Any], output_uri: str, stage_dir: str,
            run: dict[str, Any]) -> dict[str, Any]:
    from dinov2_core.utils.atomic import atomic_write_text
    from tasks import artifacts
    from tasks.tracking import Tracker

    results = {stage: StageResult.from_dict(data) for stage, data in inputs["results"].items()}
    os.makedirs(output_uri, exist_ok=True)
    text = [f"# Pipeline report: {config['run_name']}\n\n", "## Stages\n\n", stage_table(results), "\n"]
    for name, table in evaluation_tables(results).items():
        text += [f"## Evaluation of the {name} backbone\n\n", table, "\n"]
    figures = pca_figures(results)
    if figures:
        text += ["## PCA feature maps\n\n", *[f"![{os.path.basename(p)}]({p})\n" for p in figures], "\n"]
    markdown = "".join(text)
    report_path = os.path.join(output_uri, "report.md")
    atomic_write_text(report_path, markdown)
    artifacts.markdown(config["run_name"], "report", markdown, "End-to-end pipeline report")
    for path in figures:
        backbone = os.path.basename(os.path.dirname(path))
        artifacts.figure(config["run_name"], f"{backbone}-pca-maps", path,
                         f"PCA feature maps of the {backbone} backbone (first 3 components, background masked)")

    tracking = config.get("tracking") or {}
    model: dict[str, Any] = {}
    parent = run.get("parent_run_id")
    if tracking.get("enabled") and tracking.get("uri") and parent:
        tracker = Tracker(tracking["uri"], tracking["experiment"])
        tracker.log_metrics(parent, key_metrics(results))
        tracker.log_artifact(parent, report_path)
        for path in figures:
            tracker.log_artifact(parent, path, os.path.basename(os.path.dirname(path)))
        history = history_figure(tracking, config["work_dir"], key_metrics(results), os.path.join(output_uri, "history.png"))
        if history:
            tracker.log_artifact(parent, history)
        final = final_backbone(results)
        if tracking.get("log_model") and final:
            model = register_if_changed(tracker, parent, final, results, tracking.get("registered_model_name"))
    return {"outputs": {"dir": output_uri, "report": report_path}, "markdown": markdown, "model": model,
            "metrics": {}, "artifacts": []}


def history_figure(tracking: dict[str, Any], work_dir: str, current: dict[str, float], out_path: str) -> str | None:
    """kNN top-1 of every pipeline run of this run directory against the parameters that changed between
    them (one point per run, labelled with what differed from the previous run): the comparison users
    open first when a weekly retraining moves the numbers."""
    from tasks.tracking import compare_runs

    columns, rows = compare_runs(tracking["uri"], tracking["experiment"], work_dirs=[work_dir], max_runs=50,
                                 metric_filter=("knn.top1",))
    metric = next((k for k in sorted(current) if ".knn.top1.k" in k and "baseline" not in k), None)
    if metric is None or not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from curation.plots import save_png

    rows = list(reversed(rows))  # oldest first
    params = [c for c in columns if c not in ("run", "name", "status", "recomputed") and "knn" not in c]
    points = [(i, float(row[metric]) if row.get(metric) else current[metric] if i == len(rows) - 1 else None)
              for i, row in enumerate(rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    ax.plot([i for i, v in points if v is not None], [100 * v for i, v in points if v is not None], "o-")
    for i, row in enumerate(rows):
        changed = [f"{p.split('.')[-1]}={row[p]}" for p in params if i and row.get(p) != rows[i - 1].get(p)]
        label = "\n".join(changed[:3]) or ("first run" if i == 0 else "new data" if row.get("recomputed") else "")
        ax.annotate(label, (i, 100 * (points[i][1] or 0)), textcoords="offset points", xytext=(0, 8), ha="center",
                    fontsize=7)
    ax.set_xticks(range(len(rows)), [row["name"] for row in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} across the runs of {os.path.basename(work_dir)}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, out_path)


def final_backbone(results: dict[str, StageResult]) -> tuple[str, str] | None:
    """The last training stage that ran: the model this pipeline delivers."""
    for stage in ("distill", "highres", "pretrain"):
        result = results.get(stage)
        export_dir = result.outputs.get("export_dir") if result else None
        if export_dir and os.path.isdir(export_dir):
            return stage, export_dir
    return None


def weights_digest(export_dir: str) -> str:
    digest = hashlib.sha256()
    with open(os.path.join(export_dir, "backbone.pth"), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def register_if_changed(tracker, parent: str, final: tuple[str, str], results: dict[str, StageResult],
                        registered_name: str | None) -> dict[str, Any]:
    """Log and register the delivered backbone, unless the latest registered version has the same weights."""
    stage, export_dir = final
    digest = weights_digest(export_dir)
    evaluation = results.get("eval")
    metrics = dict((evaluation.metrics if evaluation else {}).get(stage) or {})
    if registered_name:
        latest = tracker.latest_model_version(registered_name)
        if latest is not None and latest.tags.get(WEIGHTS_TAG) == digest:
            tracker.set_tags(parent, {"registered_model": f"{registered_name} v{latest.version} (unchanged weights)"})
            return {"stage": stage, "registered_name": registered_name, "registered_version": str(latest.version),
                    "model_uri": latest.source, "new_version": False}
    model = tracker.log_backbone(parent, export_dir, {**metrics, WEIGHTS_TAG: digest}, registered_name)
    return {**model, "stage": stage, "new_version": bool(registered_name)}
