"""Shared fixtures: small generated data and real services (moto S3 on 127.0.0.1, Slurm).

Services started by ``infra/*/up.sh`` are used when their environment variables are set; otherwise
a fixture starts its own (moto) or the test is skipped with the command to start it (Slurm). With
``DINOV2_REQUIRE_SERVICES=1`` (set by CI) a missing service is an error, never a silent skip.
"""

from __future__ import annotations

import os
import uuid

import pytest

REQUIRE_SERVICES = os.environ.get("DINOV2_REQUIRE_SERVICES") == "1"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; sets the AWS_* variables s3fs/boto read."""
    endpoint = os.environ.get("DINOV2_TEST_S3_ENDPOINT")
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
