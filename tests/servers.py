"""Private servers for fault tests: a Redis, a RabbitMQ node, a TCP proxy, each a
real process of its own on a free port, so a test can kill, freeze or restart it
without touching the shared servers other tests use."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import skip_or_fail
from tests.procs import free_port

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


def wait_port(port: int, timeout: float, *, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not open port {port}") from None
            time.sleep(0.1)


class PrivateRedis:
    """A redis-server that keeps nothing on disk: a restart comes back empty."""

    def __init__(self, tmp: Path) -> None:
        if shutil.which("redis-server") is None:
            skip_or_fail("redis-server is not installed")
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, 10, what="redis-server")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class PrivateRabbit:
    """A RabbitMQ node of its own (name, ports, data directory). A restart keeps
    its data, as a real broker restart does: durable queues and persistent
    messages survive it."""

    def __init__(self, tmp: Path) -> None:
        if not (RABBIT_BIN / "rabbitmq-server").exists():
            skip_or_fail(f"RabbitMQ is not installed under {RABBIT_BIN}")
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"tr{self.port}@localhost"
        self.dir = tmp / f"rabbit-{self.port}"
        self.dir.mkdir(parents=True)
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.port}\nloopback_users = none\n"
        )
        (self.dir / "env.conf").write_text("")
        (self.dir / "enabled_plugins").write_text("[].\n")
        cookie = Path("/var/lib/rabbitmq/.erlang.cookie")
        if cookie.exists():  # rabbitmqctl and the node must agree on it
            (self.dir / ".erlang.cookie").write_bytes(cookie.read_bytes())
            (self.dir / ".erlang.cookie").chmod(0o400)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.dir),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "env.conf"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(RABBIT_BIN / "rabbitmq-server")],
            env=self._env(),
            stdout=(self.dir / "out.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_port(self.port, 60, what="rabbitmq-server")

    def stop(self) -> None:
        """A clean broker stop (what a restart for an upgrade does)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, "stop"],
            env=self._env(),
            capture_output=True,
            timeout=60,
        )
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class TcpProxy:
    """A TCP forwarder in a process of its own: kill it and every connection
    through it breaks and new ones are refused, as when a server becomes
    unreachable; start it again on the same port and it is back."""

    def __init__(self, target_host: str, target_port: int, *, delay_ms: int = 0) -> None:
        self.port = free_port()
        self.target = f"{target_host}:{target_port}"
        self.delay_ms = delay_ms
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.tcpproxy",
                str(self.port),
                self.target,
                str(self.delay_ms),
            ],
            cwd=Path(__file__).resolve().parent.parent,
        )
        wait_port(self.port, 10, what="the TCP proxy")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
