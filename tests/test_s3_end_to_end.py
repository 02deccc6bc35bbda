"""End to end on real servers: raw data read from S3, an MLflow server storing artifacts on S3,
the model registered and promoted at the end; and a stage started while the MLflow server is down."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from e4srec import contracts as c
from e4srec import storage
from helpers import e4srec, free_port
from helpers import mlflow_server as start_mlflow_server
from s3server import BUCKET


@pytest.fixture(scope="module")
def mlflow_server(s3, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN001, ANN201
    """`mlflow server` on 127.0.0.1 with a SQLite backend and artifacts proxied to S3."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with start_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", f"s3://{BUCKET}/mlflow", s3.env(), root) as url:
        yield url


@pytest.mark.timeout(900)
def test_pipeline_from_s3_with_mlflow_server_artifacts_on_s3(mlflow_server: str, beauty_slice: Path,
                                                             tmp_path: Path) -> None:
    storage.client().upload_file(str(beauty_slice), BUCKET, "raw/beauty_800.txt")
    result = e4srec("run", "--input", f"s3://{BUCKET}/raw/beauty_800.txt", "--pipeline-root", tmp_path / "runs",
                    "--sasrec-epochs", "1", "--backbone", "tiny", "--e4srec-max-examples", "64",
                    "--e4srec-eval-users", "50", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "e4srec-beauty_800: E4SRec version 1, SASRec version 2 registered" in result.stdout
    verdict = c.read_json(next((tmp_path / "runs").glob("e4srec-*/deploy/verdict/verdict.json")))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    champion = client.get_model_version_by_alias("e4srec-beauty_800", "champion")
    # the better of the run's two; a str over REST (an int from SQLite): compared as strings
    assert str(champion.version) == verdict["challenger_version"] and verdict["promote"]
    stored = storage._keys(BUCKET, "mlflow/")
    assert any(k.endswith("MLmodel") for k in stored) and any(k.endswith("adapter_model.safetensors") for k in stored)
    assert any(k.endswith("report.html") for k in stored)


def test_stage_start_with_the_mlflow_server_down(beauty_slice: Path, tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    t0 = time.time()
    result = e4srec("prepare-data", "--input", beauty_slice, "--output", tmp_path / "out",
                    env={"MLFLOW_TRACKING_URI": down})
    assert result.returncode == 1 and f"MLflow server {down} is not answering" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and time.time() - t0 < 60
    assert not (tmp_path / "out").exists()


def test_a_stage_refuses_an_mlflow_2_server_in_one_line(beauty_slice: Path, tmp_path: Path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class OldMLflow(BaseHTTPRequestHandler):  # answers /health and /version as an MLflow 2.x server does
        def do_GET(self) -> None:  # noqa: N802
            body = {"/health": b"OK", "/version": b"2.9.2"}.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), OldMLflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    old = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        result = e4srec("prepare-data", "--input", beauty_slice, "--output", tmp_path / "out",
                        env={"MLFLOW_TRACKING_URI": old})
    finally:
        server.shutdown()
    assert result.returncode == 1 and f"MLflow server {old} is version 2.9.2; the stages need 3.0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
