"""A real S3 server (moto's server mode) on 127.0.0.1 for registry tests, and the four backends.

The server is started and stopped by the test session; obstore reaches it through the usual AWS
environment variables (``AWS_ENDPOINT``, ``AWS_ALLOW_HTTP``, dummy keys), so processes a test starts
find it too. moto checks conditional writes (412) without a lock: it proves the semantics of
create-only puts and compare-and-swap, not races (those run on the local backends).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "test-access-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret-key-0123",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ALLOW_HTTP": "true",
}
BACKENDS = ["dir", "file", "memory", "s3"]


class S3Server:
    """moto's ThreadedMotoServer on 127.0.0.1 (a free port), and buckets on it."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def env(self) -> dict[str, str]:
        return {**S3_ENV, "AWS_ENDPOINT": self.endpoint}

    def new_bucket(self) -> str:
        import boto3

        name = f"reg-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The AWS environment variables that point obstore (here and in child processes) at moto."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


def backend_url(kind: str, tmp_path: Path, request) -> str:
    """A fresh, empty registry of ``kind``: a directory, ``file://``, ``memory://`` or an S3 bucket."""
    if kind == "dir":
        return str(tmp_path / "registry")
    if kind == "file":
        return (tmp_path / "registry").as_uri()
    if kind == "memory":
        return f"memory://{uuid.uuid4().hex}"
    server = request.getfixturevalue("s3_env")
    return f"s3://{server.new_bucket()}/adapters"


def corrupt_blob(store, sha256: str) -> None:
    """Flip the last byte of a stored blob, whatever the backend (as disks and buckets rot)."""
    if hasattr(store, "bucket"):
        key = f"blobs/{sha256}"
        data = bytearray(store.bucket.get(key).data)
        data[-1] ^= 0xFF
        store.bucket.put(key, bytes(data))
    else:
        path = store.root / "blobs" / sha256
        os.chmod(path, 0o644)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))


def delete_blob(store, sha256: str) -> None:
    if hasattr(store, "bucket"):
        store.bucket.delete(f"blobs/{sha256}")
    else:
        (store.root / "blobs" / sha256).unlink()
