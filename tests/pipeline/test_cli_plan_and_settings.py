"""The CLI before anything runs: ``run --dry-run`` plans the shipped cluster configs (no GPU, no data
needed), and every setting the CLI needs from Prefect is in place before Prefect is imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.pipeline.conftest import REPO_ROOT

PIPELINES = REPO_ROOT / "configs" / "pipeline"


@pytest.mark.parametrize("config, world_size, arch", [("vitg14_lvd.yaml", 96, "vit_giant2"),
                                                      ("slurm_example.yaml", None, None)])
def test_pipeline_dry_run_plans_every_stage(config, world_size, arch, tmp_path):
    out = subprocess.run([sys.executable, "-m", "dinov2_pipeline", "run", str(PIPELINES / config), "--dry-run",
                          f"work_dir={tmp_path}/run"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for stage in ("ingest", "embed", "pretrain", "eval", "report"):
        assert f"=== {stage} ===" in out.stdout
    assert "memory/GPU:" in out.stdout and "checkpoint:" in out.stdout and "lr: base" in out.stdout
    if world_size:
        assert f"= world size {world_size}" in out.stdout and arch in out.stdout
    assert not os.path.exists(tmp_path / "run"), "a dry run writes nothing"


def test_prefect_settings_take_effect(tmp_path):
    """``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` and the quiet console are read by Prefect at
    import: the CLI must set them first (a 20 s default made ``run`` and ``demo`` die on a loaded machine)."""
    code = (
        "import sys\n"
        "from dinov2_pipeline.cli import main\n"
        f"main(['status', {str(tmp_path)!r}])\n"
        "from dinov2_pipeline.commands.pipeline import prepare_environment\n"
        "assert 'prefect' not in sys.modules, 'prefect imported before the settings were made'\n"
        "prepare_environment(None)\n"
        "from prefect.settings import get_current_settings\n"
        "s = get_current_settings()\n"
        "print(s.server.ephemeral.startup_timeout_seconds, s.logging.level)\n"
        "import logging; print(logging.getLevelName(logging.getLogger('mlflow').level))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER_EPHEMERAL")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    timeout, _ = out.stdout.split("\n")[0].split()
    assert float(timeout) == 120 and out.stdout.split("\n")[1] == "WARNING"
