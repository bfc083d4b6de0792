"""Ingest under faults: a real moto S3 server that goes down mid-read (and comes back, or not), and
odd directory entries (a directory named like an image, symlink loops, a non-UTF-8 file name).

The S3 server here is this test's own (werkzeug + moto's WSGI app on a free port), never the shared
one: it is stopped by closing its listening socket, so clients get "connection refused", as when a
real endpoint restarts. Requests use HTTP/1.0 so no pooled connection outlives the stop.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time

import pytest

from curation.config import IngestConfig
from curation.ingest import TRANSIENT_REASON, IngestIncompleteError, run_ingest
from curation.sources import listing_digest
from curation.stage_io import RESULT_FILE, read_parquet
from dinov2_core.utils.errors import is_transient_error
from tests.curation.conftest import TEST_CLUSTER, distinct_image


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class FlakyS3:
    """A moto S3 server that stops after ``stop_after`` object reads and restarts ``down_s`` later
    (never, with ``down_s=None``). Object data lives in moto's in-process backend, so it survives."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

        class OneRequestPerConnection(MotoRequestHandler):
            protocol_version = "HTTP/1.0"

        self._handler = OneRequestPerConnection
        self._app = DomainDispatcherApplication(create_backend_app)
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.object_reads = 0
        self.stop_after: int | None = None
        self.down_s: float | None = None
        self.stopped = threading.Event()
        self.restarted = threading.Event()
        self._trigger = threading.Event()
        self._lock = threading.Lock()
        self._server = None

    def _counting_app(self, environ, start_response):
        path = environ.get("PATH_INFO", "").strip("/")
        if environ["REQUEST_METHOD"] == "GET" and "/" in path:  # GetObject: /bucket/key
            with self._lock:
                self.object_reads += 1
                if self.stop_after is not None and self.object_reads == self.stop_after:
                    self._trigger.set()
        return self._app(environ, start_response)

    def start(self) -> None:
        from werkzeug.serving import make_server

        self._server = make_server("127.0.0.1", self.port, self._counting_app, threaded=True,
                                   request_handler=self._handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()  # closing the socket: new connections are refused

    def fail_after(self, reads: int, down_s: float | None) -> None:
        """Stop after ``reads`` object reads; restart ``down_s`` seconds later (``None``: stay down)."""
        self.stop_after, self.down_s = reads, down_s

        def controller() -> None:
            if not self._trigger.wait(timeout=120):
                return
            self.stop()
            self.stopped.set()
            if self.down_s is not None:
                time.sleep(self.down_s)
                self.start()
                self.restarted.set()

        threading.Thread(target=controller, daemon=True).start()


@pytest.fixture
def flaky_s3(monkeypatch):
    server = FlakyS3()
    server.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # botocore's own retries would hide a short outage (and take ~8 s per failed read when it is long):
    # here only ingest's retries are under test
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield server
    if not server.stopped.is_set() or server.restarted.is_set():
        server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def _upload_images(endpoint: str, count: int) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"flaky-{os.getpid()}-{time.monotonic_ns()}"
    client.create_bucket(Bucket=bucket)
    for index in range(count):
        buffer = io.BytesIO()
        distinct_image(index, size=8).save(buffer, "PNG")
        client.put_object(Bucket=bucket, Key=f"raw/class{index % 3}/{index:04d}.png", Body=buffer.getvalue())
    return f"s3://{bucket}/raw"


def test_s3_restart_during_reads_loses_nothing(flaky_s3, tmp_path):
    source = _upload_images(flaky_s3.endpoint, 240)
    flaky_s3.fail_after(reads=60, down_s=1.0)
    cfg = IngestConfig(files_per_task=20, read_retries=6, read_backoff_s=0.2, cluster=TEST_CLUSTER)
    result = run_ingest(cfg, source, str(tmp_path / "out"))
    assert flaky_s3.stopped.is_set() and flaky_s3.restarted.is_set()
    assert result["transient_retries"] > 0  # reads did fail while the server was down ...
    assert result["num_images"] == 240 and result["num_rejected"] == 0  # ... and were all recovered
    assert result["transient_failures"] == 0 and result["complete"] is True
    assert len(read_parquet(result["manifest"])) == 240
    assert os.path.exists(tmp_path / "out" / RESULT_FILE)


def test_s3_outage_that_outlasts_the_retries_fails_the_stage_and_a_rerun_recovers(flaky_s3, tmp_path):
    source = _upload_images(flaky_s3.endpoint, 40)
    out = tmp_path / "out"
    flaky_s3.fail_after(reads=10, down_s=None)
    cfg = IngestConfig(files_per_task=10, read_retries=2, read_backoff_s=0.05, cluster=TEST_CLUSTER)
    with pytest.raises(IngestIncompleteError) as err:
        run_ingest(cfg, source, str(out))
    message = str(err.value)
    assert "could not be read after 2 retries" in message and "max_loss_fraction=1.00%" in message
    assert is_transient_error(err.value)  # a task-level retry is the right response
    assert not os.path.exists(out / RESULT_FILE)
    rejects = read_parquet(str(out / "rejects.parquet")).to_pylist()
    lost = [r for r in rejects if r["reason"] == TRANSIENT_REASON]
    assert lost and len(lost) == len(rejects)  # never recorded as broken ("unreadable") images
    assert f" {len(lost)} of 40 images ({len(lost) / 40:.2%})" in message
    assert all("EndpointConnectionError" in r["detail"] or "Connect" in r["detail"] for r in lost)

    flaky_s3.start()  # the storage is back: the same call recomputes (nothing was marked finished)
    flaky_s3.restarted.set()
    result = run_ingest(cfg, source, str(out))
    assert result["num_images"] == 40 and result["complete"] is True and result["transient_failures"] == 0
    assert os.path.exists(out / RESULT_FILE)


def test_losses_within_the_tolerated_fraction_write_outputs_but_do_not_finish(flaky_s3, tmp_path):
    source = _upload_images(flaky_s3.endpoint, 30)
    out = tmp_path / "out"
    flaky_s3.fail_after(reads=20, down_s=None)
    cfg = IngestConfig(files_per_task=10, read_retries=1, read_backoff_s=0.05, max_loss_fraction=1.0,
                       cluster=TEST_CLUSTER)
    result = run_ingest(cfg, source, str(out))
    assert result["complete"] is False and result["transient_failures"] >= 1
    assert result["num_images"] + result["transient_failures"] == 30
    assert result["loss_fraction"] == pytest.approx(result["transient_failures"] / 30)
    assert result["rejected_by_reason"] == {TRANSIENT_REASON: result["transient_failures"]}
    assert not os.path.exists(out / RESULT_FILE)


def test_odd_entries_are_reported_not_silently_skipped(tmp_path):
    root = tmp_path / "images"
    (root / "cats").mkdir(parents=True)
    for index in range(3):
        distinct_image(index).save(root / "cats" / f"{index}.png")
    (root / "cats" / "folder.jpg").mkdir()  # a directory named like an image, holding one image
    distinct_image(7).save(root / "cats" / "folder.jpg" / "inside.png")
    os.symlink("loop.jpg", root / "cats" / "loop.jpg")  # resolves to itself
    os.symlink("gone.jpg", root / "cats" / "dangling.jpg")
    os.symlink("..", root / "cats" / "up")  # a directory link back to the source root
    bad_name = os.path.join(os.fsencode(root / "cats"), b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    buffer = io.BytesIO()
    distinct_image(8).save(buffer, "PNG")
    with open(bad_name, "wb") as handle:
        handle.write(buffer.getvalue())
    os.mkfifo(root / "cats" / "pipe.png")
    (root / "cats" / "notes.txt").write_text("not an image: ignored, as before")

    listing_digest(str(root))  # used to raise UnicodeEncodeError on the non-UTF-8 name
    result = run_ingest(IngestConfig(cluster=TEST_CLUSTER), str(root), str(tmp_path / "out"))
    rejects = {os.path.relpath(r["uri"], root): (r["reason"], r["detail"])
               for r in read_parquet(result["rejects"]).to_pylist()}
    assert rejects["cats/folder.jpg"][0] == "not_a_file"
    assert rejects["cats/loop.jpg"][0] == "symlink_loop"
    assert rejects["cats/up"][0] == "symlink_loop"
    assert rejects["cats/dangling.jpg"] == ("broken_symlink", "-> gone.jpg")
    assert rejects["cats/caf\\xe9.png"][0] == "bad_name"
    assert rejects["cats/pipe.png"][0] == "not_a_file"
    assert len(rejects) == 6
    kept = sorted(os.path.relpath(r["uri"], root) for r in read_parquet(result["manifest"]).to_pylist())
    assert kept == ["cats/0.png", "cats/1.png", "cats/2.png", "cats/folder.jpg/inside.png"]
    assert result["complete"] is True and result["transient_failures"] == 0
