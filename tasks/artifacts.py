"""Prefect artifacts for stages: a summary table per stage, the job log tail, a training progress bar.

Everything published goes through the secret scrubber first. Keys are lowercase-with-dashes (``<run-name>-<stage>-summary``) so each shows up on the Artifacts page
and is versioned across runs. Outside a Prefect run (stage functions called directly) these are no-ops.
"""

from __future__ import annotations

import os
import re
from typing import Any

from dinov2_core.utils.redact import redact, redact_text


def artifact_key(*parts: str) -> str:
    """``("Demo Run", "pretrain", "summary")`` → ``demo-run-pretrain-summary``."""
    key = "-".join(parts).lower()
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", key)).strip("-")


def _in_prefect_run() -> bool:
    from prefect.context import TaskRunContext, FlowRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def _scalar_rows(data: dict[str, Any], prefix: str = "") -> list[dict[str, str]]:
    rows = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_scalar_rows(value, name + "."))
        elif isinstance(value, float):
            rows.append({"key": name, "value": f"{value:.4g}"})
        else:
            rows.append({"key": name, "value": str(value)})
    return rows


def stage_summary(run_name: str, stage: str, result: dict[str, Any]) -> None:
    """A table artifact with the stage's outputs, counts and metrics."""
    if not _in_prefect_run():
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact(
        table=_scalar_rows(redact(result)),
        key=artifact_key(run_name, stage, "summary"),
        description=f"{stage}: outputs, counts and metrics",
    )


def markdown(run_name: str, name: str, text: str, description: str = "") -> None:
    if not _in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=redact_text(text), key=artifact_key(run_name, name),
                             description=description or name)


def figure(run_name: str, name: str, path: str, description: str) -> None:
    """A PNG as a Markdown artifact with the image inline (a data URI: the UI cannot reach the file)."""
    if not _in_prefect_run() or not os.path.exists(path):
        return
    import base64

    from prefect.artifacts import create_markdown_artifact

    with open(path, "rb") as handle:
        encoded = base64.b64encode(handle.read()).decode("ascii")
    create_markdown_artifact(markdown=f"### {description}\n\n![{os.path.basename(path)}](data:image/png;base64,{encoded})\n",
                             key=artifact_key(run_name, name), description=description)


def job_log(run_name: str, stage: str, handle, lines: int = 60) -> None:
    """A Markdown artifact with the job's state and the tail of its logs inline (the Prefect UI cannot
    open ``file://`` links to the cluster's filesystem)."""
    if not _in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact

    tail = handle.log_tail(lines) if hasattr(handle, "log_tail") else "(ran in the flow process: see its logs)"
    paths = "\n".join(f"- `{path}`" for path in handle.log_paths()) or "- (none)"
    fence = "~~~~"  # a log line may contain Markdown's backtick fence
    text = (f"### {stage}: {handle.kind} job {handle.job_id} ({handle.state()})\n\nLog files:\n{paths}\n\n"
            f"{fence}text\n{tail}\n{fence}\n")
    create_markdown_artifact(markdown=redact_text(text), key=artifact_key(run_name, stage, "job-log"),
                             description=f"{stage}: tail of the {handle.kind} job's logs")


class Progress:
    """A progress artifact (0–100 %) updated while a training job runs."""

    def __init__(self, run_name: str, stage: str, total: int | None) -> None:
        self.total = total
        self.artifact_id = None
        self.last = -1.0
        if _in_prefect_run() and total:
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(
                progress=0.0, key=artifact_key(run_name, stage, "progress"), description=f"{stage} training progress"
            )

    def update(self, iteration: int | None) -> None:
        if self.artifact_id is None or iteration is None or not self.total:
            return
        percent = min(100.0, 100.0 * (iteration + 1) / self.total)
        if percent - self.last >= 1.0 or percent == 100.0:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, percent)
            self.last = percent
