"""Build the CPU image with buildah and run a stage inside it (opt-in: E4SREC_IMAGE_TEST=1).

Needs buildah and mmdebstrap (Debian packages) and network access to Debian and PyPI; takes minutes
and a few GB, so `make test` leaves it out. Nothing here can run a container engine: `buildah run`
with chroot isolation is enough to execute the stage's CLI in the image's root filesystem.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(os.environ.get("E4SREC_IMAGE_TEST") != "1", reason="opt-in: set E4SREC_IMAGE_TEST=1"),
    pytest.mark.timeout(3600),
]
BUILDAH = ["buildah", "--storage-driver", "vfs"]


def sh(*cmd: str | Path, **kw: object) -> str:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout.strip()


def test_cpu_image_builds_and_runs_prepare_data(tmp_path: Path, beauty_slice: Path) -> None:
    for tool in ("buildah", "mmdebstrap"):
        assert shutil.which(tool), f"{tool} is missing: apt-get install buildah mmdebstrap"
    sh("mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
       tmp_path / "rootfs.tar")
    base = sh(*BUILDAH, "from", "scratch")
    sh(*BUILDAH, "add", base, tmp_path / "rootfs.tar", "/")
    sh(*BUILDAH, "commit", base, "localhost/e4srec-test-base:bookworm")
    wheels = tmp_path / "wheels"  # the CPU torch wheel, from wherever this machine's pip finds it
    sh(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "torch==2.13.0+cpu", "-d", wheels)
    ca = "/etc/ssl/certs/ca-certificates.crt"
    sh(*BUILDAH, "bud", "--isolation", "chroot", "-v", f"{wheels}:/wheels:ro", "-v", f"{ca}:/ca.crt:ro",
       "--build-arg", "BASE=localhost/e4srec-test-base:bookworm", "--build-arg", "TORCH_INDEX=--find-links /wheels",
       "--build-arg", "PIP_CERT=/ca.crt", "-f", "images/cpu/Containerfile", "-t", "localhost/e4srec-cpu:test", ".",
       cwd=REPO)
    container = sh(*BUILDAH, "from", "localhost/e4srec-cpu:test")
    out = tmp_path / "out"
    out.mkdir()
    sh(*BUILDAH, "run", "--isolation", "chroot", "-v", f"{beauty_slice.parent}:/data:ro", "-v", f"{out}:/out",
       container, "--", "e4srec", "prepare-data", "--input", f"/data/{beauty_slice.name}", "--output", "/out/data",
       "--no-tracking")
    assert (out / "data" / "manifest.json").is_file()
    sh(*BUILDAH, "rm", container)
