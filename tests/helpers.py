"""Helpers the tests import (conftest.py holds the fixtures)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


def write_slice(src: Path, dst: Path, n_lines: int) -> Path:
    """The first n_lines users of an S3-Rec file."""
    with open(src) as f:
        lines = [next(f) for _ in range(n_lines)]
    dst.write_text("".join(lines))
    return dst


def digest(paths: list[Path]) -> dict[str, str]:
    """SHA-256 of every file under each path (and the mode of each folder): any change to an input shows."""
    out: dict[str, str] = {}
    for root in paths:
        if not root.exists():
            continue
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else oct(p.stat().st_mode)
    return out


def e4srec(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the `e4srec` CLI in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "e4srec.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, **(env or {})}, timeout=600,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    """Return once `url` answers 2xx; fail with the end of `log` if `server` exits or `timeout` passes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"the server behind {url} exited ({server.returncode}):\n{log.read_text()[-3000:]}")
            time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s; see {log}")


@contextmanager
def mlflow_server(backend_store: str, artifacts: str, env: dict[str, str], log_dir: Path,
                  workers: int = 1) -> Iterator[str]:
    """`mlflow server` on a free 127.0.0.1 port with `artifacts` proxied (an s3:// URI with the S3 server's
    settings in `env`); yields its URL once /health answers, stops it on the way out."""
    port = free_port()
    env = {**os.environ, **env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = log_dir / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store, "--artifacts-destination",
         artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)], env=env,
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/health", proc, log, timeout=180)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
