"""A local S3 for tests: moto's standalone server on a free loopback port, in its own process.

`s3_server` (session scope) yields an S3Server: its endpoint URL, the storage_options that
pipeline.storage takes, and helpers to make a fresh bucket and upload files. Dummy AWS
credentials are set in the environment for the session, so Ray workers started afterwards see
them too. Project code is not patched: it talks to the server over HTTP like to any S3.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

_DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    endpoint_url: str

    @property
    def storage_options(self) -> dict:
        # Credentials are given explicitly too, so processes started before the fixture (a Ray
        # cluster already running) can reach the server without the environment variables.
        return {
            "endpoint_url": self.endpoint_url,
            "key": _DUMMY_AWS_ENV["AWS_ACCESS_KEY_ID"],
            "secret": _DUMMY_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        }

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint_url}, use_listings_cache=False)

    def make_bucket(self, prefix: str = "test") -> str:
        """A new empty bucket with a unique name; returns its s3:// URI."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}".lower()
        self.filesystem().mkdir(name)
        return f"s3://{name}"

    def upload(self, local: str | Path, uri: str) -> str:
        """Copy a local file (or a folder, recursively) to an s3:// URI; returns the URI."""
        fs = self.filesystem()
        local = Path(local)
        target = uri.removeprefix("s3://")
        if local.is_dir():
            for p in sorted(local.rglob("*")):
                if p.is_file():
                    fs.put_file(str(p), f"{target}/{p.relative_to(local).as_posix()}")
        else:
            fs.put_file(str(local), target)
        return uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **_DUMMY_AWS_ENV}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"moto server exited with code {proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start within 60 s") from None
                time.sleep(0.2)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in _DUMMY_AWS_ENV.items():
                mp.setenv(key, value)
            # Endpoint variables left by the environment would point pipeline.storage elsewhere.
            mp.delenv("AWS_ENDPOINT_URL", raising=False)
            mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
            yield S3Server(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
