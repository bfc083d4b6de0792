"""Register the deployments of ``deployments/prefect.yaml`` on a Prefect server.

Equivalent to ``prefect work-pool create <pool> --type process`` followed by
``prefect deploy --prefect-file deployments/prefect.yaml --all`` run from the repository root (the
entrypoints in the file are relative to it). ``dinov2-pipeline deploy`` calls :func:`deploy`, optionally
with the flow parameters every registered deployment runs with (``--params``: which pipeline config and
overrides) and a cron schedule that replaces the file's for the ``pipeline`` deployment (``--cron``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    options = ["--params", json.dumps(parameters)] if parameters else []
    if parameters and not names:  # evaluate-checkpoint takes other parameters
        names = [n for n in deployment_names(prefect_file) if n != "evaluate-checkpoint"]
    if cron:
        # the schedule belongs to the end-to-end deployment only; the stage deployments are run by hand
        _prefect_deploy(prefect, env, prefect_file, pool, ["--name", "pipeline", *options, "--cron", cron,
                                                           "--timezone", timezone])
        names = [n for n in (names or deployment_names(prefect_file)) if n != "pipeline"]
        if not names:
            return
    selection = [x for name in names for x in ("--name", name)] if names else ["--all"]
    _prefect_deploy(prefect, env, prefect_file, pool, [*selection, *options])


def deployment_names(prefect_file: str = PREFECT_FILE) -> list[str]:
    import yaml

    with open(prefect_file, encoding="utf-8") as handle:
        return [d["name"] for d in yaml.safe_load(handle)["deployments"]]


def _prefect_deploy(prefect: list[str], env: dict[str, str], prefect_file: str, pool: str, args: list[str]) -> None:
    result = subprocess.run(
        [*prefect, "--no-prompt", "deploy", "--prefect-file", prefect_file, "--pool", pool, *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"prefect deploy failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


if __name__ == "__main__":
    deploy(sys.argv[1:] or None)
