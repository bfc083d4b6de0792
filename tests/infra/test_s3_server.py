"""Smoke test of the moto S3 server: s3fs and the project's URI layer both reach it through AWS_ENDPOINT_URL."""

from __future__ import annotations

import s3fs

from dinov2_core.utils.uri import exists, read_bytes


def test_s3fs_round_trip(s3_bucket, s3_endpoint):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    payload = bytes(range(256)) * 64
    fs.pipe(f"{s3_bucket}/dir/blob.bin", payload)

    assert fs.ls(f"{s3_bucket}/dir", detail=False) == [f"{s3_bucket[len('s3://'):]}/dir/blob.bin"]
    assert fs.cat(f"{s3_bucket}/dir/blob.bin") == payload
    assert read_bytes(f"{s3_bucket}/dir/blob.bin") == payload

    fs.rm(f"{s3_bucket}/dir/blob.bin")
    fs.invalidate_cache()
    assert not exists(f"{s3_bucket}/dir/blob.bin")
