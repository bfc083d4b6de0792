"""Stage completion manifests, input hashing, the cache policy and the retry policy of stage tasks.

A stage is *finished* iff its directory holds ``_SUCCESS.json`` whose ``input_hash`` equals the hash
of the stage's current inputs (its resolved config and the outputs of the stages upstream, which
carry their own hashes, so a change anywhere upstream propagates down). The manifest is written
atomically, last, after every output exists, so it survives the loss of the Prefect database and a
killed flow process never leaves a stage that looks finished but is not.

``_state.json`` next to it records what is happening now (running / failed, the job id) for
``dinov2-pipeline status``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE

from dinov2_core.utils.atomic import atomic_write_json
from dinov2_core.utils.config import ConfigError

SUCCESS_FILE = "_SUCCESS.json"
STATE_FILE = "_state.json"

# No RUN_ID: a *new* flow run (resume, schedule) reuses a finished stage. The tracking context
# (MLflow parent run, flow-run id) differs between runs and must not change the key.
STAGE_CACHE_POLICY = (INPUTS - "run_context") + TASK_SOURCE


@dataclass
class StageSpec:
    """Everything a stage task needs: small, JSON-serialisable, hashable by Prefect."""

    stage: str
    stage_dir: str
    config: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)
    output_uri: str = ""
    launcher: dict[str, Any] = field(default_factory=dict)

    def input_hash(self) -> str:
        return hash_inputs({"stage": self.stage, "config": self.config, "inputs": self.inputs, "output": self.output_uri})


def hash_inputs(obj: Any) -> str:
    """A stable hash of a JSON-able object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def code_version() -> str:
    """The git commit of the checkout the code runs from (``+dirty`` if modified), else the package version."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "dinov2-pipeline==" + version("dinov2-pipeline")
        except PackageNotFoundError:
            return "unknown"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None


def read_success(stage_dir: str) -> dict[str, Any] | None:
    return read_json(os.path.join(stage_dir, SUCCESS_FILE))


def finished_result(spec: StageSpec) -> dict[str, Any] | None:
    """The recorded result of ``spec`` if the stage already finished with exactly these inputs."""
    manifest = read_success(spec.stage_dir)
    if manifest and manifest.get("input_hash") == spec.input_hash():
        return manifest["result"]
    return None


def write_success(spec: StageSpec, result: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
    """Publish the completion manifest (last, atomically) and return the stage result."""
    manifest = {
        "stage": spec.stage,
        "input_hash": spec.input_hash(),
        "inputs": spec.inputs,
        "config": spec.config,
        "code_version": code_version(),
        "finished_at": _now(),
        "outputs": sorted(outputs),
        "result": result,
    }
    atomic_write_json(os.path.join(spec.stage_dir, SUCCESS_FILE), manifest)
    write_state(spec.stage_dir, status="done")
    return result


def clear_success(stage_dir: str) -> None:
    """Forget a stage's completion (its inputs changed); outputs are left for the stage to reuse/overwrite."""
    path = os.path.join(stage_dir, SUCCESS_FILE)
    if os.path.exists(path):
        os.unlink(path)


def read_state(stage_dir: str) -> dict[str, Any]:
    return read_json(os.path.join(stage_dir, STATE_FILE)) or {}


def write_state(stage_dir: str, **updates: Any) -> dict[str, Any]:
    """Merge ``updates`` into the stage's ``_state.json`` (atomically)."""
    state = read_state(stage_dir)
    state.update(updates)
    state["updated_at"] = _now()
    atomic_write_json(os.path.join(stage_dir, STATE_FILE), state)
    return state


class TransientStageError(RuntimeError):
    """A failure worth retrying (infrastructure, not the stage's own logic)."""


def is_transient(exc: BaseException) -> bool:
    """Retry S3/network/Slurm-submission failures; never a bad config or a bug in the stage."""
    if isinstance(exc, (ConfigError, TypeError, KeyError, AttributeError, ImportError)):
        return False
    if isinstance(exc, (TransientStageError, ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if name in {"FailedSubmissionError", "ClientError", "EndpointConnectionError", "ReadTimeoutError"}:
        return True
    if module.startswith(("botocore", "aiobotocore", "s3fs")):
        return True
    # s3fs maps most S3 errors to OSError subclasses (PermissionError excepted: that is configuration).
    return isinstance(exc, OSError) and not isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError))


def retry_condition(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient failures."""
    try:
        state.result()
    except BaseException as exc:  # the state's exception is re-raised by result()
        return is_transient(exc)
    return False


def task_options(retries: int = 2) -> dict[str, Any]:
    """Keyword arguments of every stage ``@task``: cached on inputs + source, persisted, retried with
    exponential backoff on transient failures only. ``result_storage`` is set per run by the flow."""
    from prefect.tasks import exponential_backoff

    return {
        "cache_policy": STAGE_CACHE_POLICY,
        "persist_result": True,
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=5),
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": retry_condition,
    }


def split_summary(summary: dict[str, Any], output_uri: str) -> dict[str, Any]:
    """A stage function's summary → ``{"outputs": URIs, "metrics": numbers, "artifacts": local files}``.

    Strings are outputs, numbers (also nested, e.g. per-reason reject counts) are metrics; local
    ``.png``/``.md``/``.json`` outputs are also logged as MLflow artifacts.
    """
    outputs: dict[str, Any] = {"dir": output_uri}
    metrics: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, bool):
            metrics[key] = int(value)
        elif isinstance(value, (int, float)):
            metrics[key] = value
        elif isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
            metrics[key] = dict(value)
        elif isinstance(value, (str, list, dict)):
            outputs[key] = value
    artifacts = [
        v for v in outputs.values()
        if isinstance(v, str) and v.endswith((".png", ".md", ".json")) and os.path.exists(v)
    ]
    return {"outputs": outputs, "metrics": metrics, "artifacts": artifacts}
