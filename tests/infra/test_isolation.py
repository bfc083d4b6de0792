"""The test session never talks to a developer's Prefect/MLflow servers unless a test asks for one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def test_prefect_and_mlflow_are_isolated(isolated_prefect_home):
    assert "PREFECT_API_URL" not in os.environ  # unset (empty would break Prefect's events client)
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert isolated_prefect_home.is_relative_to(tempfile.gettempdir())
    assert os.environ["MLFLOW_TRACKING_URI"].startswith("sqlite:///")
    tracking_db = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    assert tracking_db.parent == isolated_prefect_home.parent


def test_prefect_settings_follow_the_isolated_environment(isolated_prefect_home):
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    assert settings.home == isolated_prefect_home
    assert not settings.api.url
