"""Register the deployments of ``deployments/prefect.yaml`` on a Prefect server.

Equivalent to ``prefect work-pool create <pool> --type process`` followed by
``prefect deploy --prefect-file deployments/prefect.yaml --all`` run from the repository root (the
entrypoints in the file are relative to it). ``dinov2-pipeline deploy`` calls :func:`deploy`, optionally
with the flow parameters every registered deployment runs with (``--params``: which pipeline config and
overrides) and a cron schedule that replaces the file's for the ``pipeline`` deployment (``--cron``): both
are written into a temporary copy of ``prefect.yaml`` that ``prefect deploy`` reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFECT_FILE = os.path.join(REPO_ROOT, "deployments", "prefect.yaml")
DEFAULT_POOL = "dinov2-process"


def deploy(
    names: list[str] | None = None,
    pool: str = DEFAULT_POOL,
    prefect_file: str = PREFECT_FILE,
    env: dict[str, str] | None = None,
    parameters: dict[str, Any] | None = None,
    cron: str | None = None,
    timezone: str = "UTC",
) -> None:
    """Create the ``process`` work pool if missing and register the named deployments (default: all),
    with ``parameters`` (default: those in the file) and, for the ``pipeline`` deployment, ``cron``."""
    env = dict(env or os.environ)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not env.get("PREFECT_API_URL"):
        raise RuntimeError(
            "deployments need a running Prefect server: start one with 'prefect server start' and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    prefect = [sys.executable, "-m", "prefect"]
    inspect = subprocess.run([*prefect, "work-pool", "inspect", pool], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True)
    if inspect.returncode != 0:
        subprocess.run([*prefect, "work-pool", "create", pool, "--type", "process"], cwd=REPO_ROOT, env=env,
                       check=True, capture_output=True, text=True)
    selection = [x for name in names for x in ("--name", name)] if names else ["--all"]
    if not parameters and not cron:
        _prefect_deploy(prefect, env, prefect_file, pool, selection)
        return
    with tempfile.TemporaryDirectory() as tmp:
        _prefect_deploy(prefect, env, customised(prefect_file, tmp, parameters, cron, timezone), pool, selection)


def customised(prefect_file: str, directory: str, parameters: dict[str, Any] | None, cron: str | None,
               timezone: str) -> str:
    """A copy of ``prefect_file`` whose deployments run with ``parameters`` (all but evaluate-checkpoint,
    which takes others) and whose ``pipeline`` deployment has the single schedule ``cron``."""
    import yaml

    with open(prefect_file, encoding="utf-8") as handle:
        spec = yaml.safe_load(handle)
    for deployment in spec["deployments"]:
        if parameters and deployment["name"] != "evaluate-checkpoint":
            deployment["parameters"] = dict(parameters)
        if cron and deployment["name"] == "pipeline":
            deployment["schedules"] = [{"cron": cron, "timezone": timezone, "active": True}]
    path = os.path.join(directory, "prefect.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(spec, handle, sort_keys=False)
    return path


def _prefect_deploy(prefect: list[str], env: dict[str, str], prefect_file: str, pool: str, args: list[str]) -> None:
    result = subprocess.run(
        [*prefect, "--no-prompt", "deploy", "--prefect-file", prefect_file, "--pool", pool, *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"prefect deploy failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


if __name__ == "__main__":
    deploy(sys.argv[1:] or None)
