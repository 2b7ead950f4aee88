"""A real `mlflow server` for tests: SQLite store and proxied artifacts in a folder, on 127.0.0.1.

It can be stopped and started again on the same port and store, which is how the tests
make a tracking-server outage.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with its store under `root` (mlflow.db, artifacts/)."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = root
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.store = f"sqlite:///{root / 'mlflow.db'}"
        self.artifacts = root / "artifacts"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout_s: float = 90) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "wb")
        mlflow = Path(sys.executable).with_name("mlflow")
        # One uvicorn worker and no job-runner processes: the machine has 2 cores to share.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", self.store, "--serve-artifacts",
             "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)  # its own process group: stop() ends the server and its workers
        log.close()
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not answer /health within {timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.1)
        return self

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.uri}/health", timeout=1).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after 10 s); the port is free after."""
        if self.process is None:
            return
        group = self.process.pid  # the group's id: the session leader's pid
        try:
            os.killpg(group, signal.SIGTERM)
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass  # already gone
        try:
            os.killpg(group, signal.SIGKILL)  # a worker that outlived the leader
        except ProcessLookupError:
            pass
        self.process = None
        deadline = time.monotonic() + 10
        while self.healthy() and time.monotonic() < deadline:
            time.sleep(0.1)

    def log_tail(self, chars: int = 3000) -> str:
        logs = sorted(self.root.glob("server-*.log"))
        return logs[-1].read_text(errors="replace")[-chars:] if logs else ""
