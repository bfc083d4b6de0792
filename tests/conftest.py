"""Shared fixtures: isolation from the developer's environment and the real local services.

Services are the ones ``infra/up.sh`` starts on 127.0.0.1 (a Slurm cluster, moto S3, a Prefect server,
an MLflow server). A fixture finds a service through its variable in the environment or, when that is
unset, in ``.infra/env.d/*.sh`` (written by the up scripts), so ``infra/up.sh && pytest`` works without
sourcing anything. A service that is not running makes its tests skip with the command that starts it;
with ``DINOV2_REQUIRE_SERVICES=1`` (set by ``infra/test.sh`` and CI) it is an error instead.

Fixtures (names are stable; other test packages rely on them):

- ``slurm_cluster`` (session): a :class:`SlurmCluster` (found through ``DINOV2_TEST_SLURM_CONF``, never
  the ambient ``SLURM_CONF``); ``SLURM_CONF`` is exported for the session.
- ``mlflow_server_uri`` (session): ``http://127.0.0.1:<port>`` of a live MLflow tracking server.
- ``prefect_server_url`` (session): ``http://127.0.0.1:<port>/api`` of a live Prefect server.
- ``s3_endpoint`` (session) / ``s3_bucket``: moto S3 (the infra one, or one started in-process).
- ``isolated_prefect_home`` (session, autouse): the private ``PREFECT_HOME`` of this test session.

Isolation, applied when this module is imported (before any test module can import prefect or mlflow,
whose settings are read at import): ``PREFECT_HOME`` is a fresh temporary directory,
``PREFECT_API_URL`` is unset (so flows use an ephemeral in-process server, never a server from the
developer's environment or a ``.env`` file), analytics are off, and ``MLFLOW_TRACKING_URI`` points at a
throwaway SQLite file, so no test writes ``mlflow.db`` or ``mlruns/`` into the working directory.
Tests that want the real servers ask for the fixtures above and pass the URL explicitly.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
INFRA_STATE = Path(os.environ.get("DINOV2_INFRA_STATE", REPO_ROOT / ".infra"))
REQUIRE_SERVICES = os.environ.get("DINOV2_REQUIRE_SERVICES") == "1"

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="dinov2-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_TMP / "prefect")
# unset, not empty: an empty PREFECT_API_URL leaves Prefect's events client without an address (every
# event then logs "EventsWorker failed" with a traceback); unset, the flow's ephemeral server is used
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_API_KEY", None)
os.environ.pop("PREFECT_PROFILE", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# The ephemeral server needs 6-7 s on an idle machine and far more on a loaded 2-core CI runner;
# Prefect's 20 s default makes the first flow of a session fail there.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_TMP / 'mlflow.db'}"


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by the services they use, so ``-m "not slurm"`` deselects them."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "slurm_cluster" in fixtures:
            item.add_marker(pytest.mark.slurm)
        if fixtures & {"s3_endpoint", "s3_bucket"}:
            item.add_marker(pytest.mark.s3)


def infra_env() -> dict[str, str]:
    """Variables published by ``infra/*/up.sh`` in ``.infra/env.d/*.sh`` (``export K=V`` lines)."""
    values: dict[str, str] = {}
    for fragment in sorted((INFRA_STATE / "env.d").glob("*.sh")):
        for line in fragment.read_text().splitlines():
            words = shlex.split(line, comments=True)
            if len(words) == 2 and words[0] == "export" and "=" in words[1]:
                key, value = words[1].split("=", 1)
                values[key] = value
    return values


def _service_setting(name: str) -> str | None:
    return os.environ.get(name) or infra_env().get(name)


def _unavailable(service: str, reason: str, start_command: str) -> None:
    message = f"{service} is not available ({reason}); start it with: {start_command}"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} [DINOV2_REQUIRE_SERVICES=1]", pytrace=False)
    pytest.skip(message)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return 200 <= response.status < 300
    except OSError:
        return False


@pytest.fixture(scope="session", autouse=True)
def isolated_prefect_home() -> Path:
    """This session's private ``PREFECT_HOME`` (the ephemeral Prefect server keeps its SQLite DB here)."""
    return Path(os.environ["PREFECT_HOME"])


@dataclass(frozen=True)
class SlurmCluster:
    """The local Slurm cluster from ``infra/slurm/up.sh``.

    ``partition`` is never preempted; jobs in ``low_partition`` are requeued (after ``GraceTime``, with
    submitit's USR2 signal) when a job in ``high_partition`` needs their resources. The node advertises
    ``cpus`` CPUs and ``gpus`` fake GPUs (``--gpus-per-node`` sets ``CUDA_VISIBLE_DEVICES``; there is no
    real device behind them). Accounting works, so ``sacct`` and submitit's ``job.state`` are real.
    """

    conf: str
    node: str
    cpus: int
    gpus: int
    partition: str = "debug"
    low_partition: str = "low"
    high_partition: str = "high"


def _node_info(conf: str) -> tuple[str, int, int]:
    env = {**os.environ, "SLURM_CONF": conf}
    out = subprocess.run(
        ["scontrol", "show", "node", "-o"], env=env, capture_output=True, text=True, timeout=20, check=True
    ).stdout
    fields = dict(word.split("=", 1) for word in out.split() if "=" in word)
    gres = fields.get("Gres", "")
    gpus = int(gres.rsplit(":", 1)[1]) if gres.startswith("gpu:") else 0
    state = fields.get("State", "")
    if not state.startswith(("IDLE", "MIXED", "ALLOCATED")):
        raise RuntimeError(f"node {fields.get('NodeName')} is {state}")
    return fields["NodeName"], int(fields["CPUTot"]), gpus


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The running local Slurm cluster; exports ``SLURM_CONF`` and ``PYTHONPATH`` for the session.

    Submit with ``submitit.AutoExecutor(folder=tmp_path, cluster="slurm")``; set ``slurm_partition`` to
    ``slurm_cluster.low_partition`` / ``high_partition`` for preemption tests. ``PYTHONPATH`` gains the
    repository root so jobs can unpickle callables defined in test modules (``tests.*``).
    """
    start = "sudo infra/setup.sh --system && sudo infra/slurm/up.sh"
    # Deliberately not the ambient SLURM_CONF: on a login node that is a real cluster.
    conf = _service_setting("DINOV2_TEST_SLURM_CONF")
    if not conf or not Path(conf).is_file():
        _unavailable("the local Slurm cluster", "DINOV2_TEST_SLURM_CONF is not set or missing", start)
    if shutil.which("sbatch") is None:
        _unavailable("the local Slurm cluster", "sbatch is not installed", start)
    try:
        node, cpus, gpus = _node_info(conf)
    except (subprocess.SubprocessError, RuntimeError, KeyError, ValueError) as error:
        _unavailable("the local Slurm cluster", f"scontrol failed: {error}", start)
    saved = {key: os.environ.get(key) for key in ("SLURM_CONF", "PYTHONPATH")}
    os.environ["SLURM_CONF"] = conf
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), saved["PYTHONPATH"]]))
    yield SlurmCluster(conf=conf, node=node, cpus=cpus, gpus=gpus)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def mlflow_server_uri() -> str:
    """Tracking URI of the running MLflow server (``infra/mlflow/up.sh``), e.g. ``http://127.0.0.1:5000``.

    ``MLFLOW_TRACKING_URI`` is *not* changed (it points at a throwaway SQLite file); pass the URI
    explicitly: ``mlflow.set_tracking_uri(uri)``, ``MlflowClient(uri)``, ``monkeypatch.setenv(...)``.
    """
    uri = _service_setting("DINOV2_TEST_MLFLOW_URI")
    if not uri:
        _unavailable("the MLflow server", "DINOV2_TEST_MLFLOW_URI is not set", "infra/mlflow/up.sh")
    if not _http_ok(f"{uri.rstrip('/')}/health"):
        _unavailable("the MLflow server", f"{uri} does not answer", "infra/mlflow/up.sh")
    return uri


@pytest.fixture(scope="session")
def prefect_server_url() -> str:
    """API URL of the running Prefect server (``infra/prefect/up.sh``), e.g. ``http://127.0.0.1:4200/api``.

    ``PREFECT_API_URL`` stays unset for ordinary tests; use the server in-process with
    ``prefect.settings.temporary_settings({PREFECT_API_URL: url})`` or pass it to subprocesses'
    environment (workers, ``prefect deploy``).
    """
    url = _service_setting("DINOV2_TEST_PREFECT_API_URL")
    if not url:
        _unavailable("the Prefect server", "DINOV2_TEST_PREFECT_API_URL is not set", "infra/prefect/up.sh")
    if not _http_ok(f"{url.rstrip('/')}/health"):
        _unavailable("the Prefect server", f"{url} does not answer", "infra/prefect/up.sh")
    return url


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; sets the AWS_* variables s3fs/boto read.

    Uses the server from ``infra/s3/up.sh`` when it answers; otherwise starts one in-process (or, with
    ``DINOV2_REQUIRE_SERVICES=1``, fails if the infra one was announced but does not answer).
    """
    endpoint = _service_setting("DINOV2_TEST_S3_ENDPOINT")
    if endpoint and not _http_ok(f"{endpoint.rstrip('/')}/moto-api/"):
        if REQUIRE_SERVICES:
            _unavailable("the moto S3 server", f"{endpoint} does not answer", "infra/s3/up.sh")
        endpoint = None
    server = None
    if not endpoint:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if server is not None:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the test S3 server; yields ``s3://<bucket>``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:
        pass
    yield f"s3://{name}"
