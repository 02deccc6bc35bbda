"""Shared fixtures: small slices of the reference data, prepared folders, an isolated MLflow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import DATA, e4srec, write_slice


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test logs to a throwaway SQLite store, never to ./mlflow.db."""
    if "MLFLOW_TRACKING_URI" not in os.environ or "pytest-" not in os.environ["MLFLOW_TRACKING_URI"]:
        db = tmp_path_factory.getbasetemp() / "mlflow.db"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")


@pytest.fixture(scope="session")
def beauty_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """800 Beauty users: big enough to learn something, small enough for seconds."""
    return write_slice(DATA / "Beauty.txt", tmp_path_factory.mktemp("raw") / "beauty_800.txt", 800)


@pytest.fixture(scope="session")
def tiny_run(beauty_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """`e4srec run` on the slice with the tiny backbone, instruction-tune skipped and tracking off:
    (its working directory, its run folder, its stdout), for the tests that read or rerun it."""
    cwd = tmp_path_factory.mktemp("tiny-run")
    result = e4srec("run", "--input", beauty_slice, "--sasrec-epochs", "1", "--backbone", "tiny",
                    "--e4srec-max-examples", "32", "--e4srec-eval-users", "50", "--no-tracking", cwd=cwd,
                    env={"MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"})  # must stay unwritten
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (cwd / "runs").glob("e4srec-*")
    return cwd, run_dir, result.stdout


@pytest.fixture(scope="session")
def prepared(beauty_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare-data output of the Beauty slice."""
    from e4srec.stages import prepare_data

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_data.run(prepare_data.PrepareDataConfig(), beauty_slice, out)
    return out


@pytest.fixture(scope="session")
def sasrec_dir(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SASRec trained for a few epochs on the slice."""
    from e4srec.stages import pretrain_sasrec

    out = tmp_path_factory.mktemp("sasrec") / "model"
    pretrain_sasrec.run(pretrain_sasrec.PretrainSasrecConfig(epochs=3, device="cpu"), prepared, out, progress=False)
    return out


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A SeaweedFS S3 server on 127.0.0.1 for the session, with its credentials in the environment."""
    from e4srec import storage
    from s3server import SeaweedFS

    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    storage.client.cache_clear()
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage.client.cache_clear()
