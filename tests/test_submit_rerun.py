"""Submit to Kubeflow (against a loopback stand-in for the KFP API) and rerun one stage locally."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from e4srec import contracts as c
from helpers import e4srec


class KFPStub(BaseHTTPRequestHandler):
    """Answers the v2beta1 calls kfp.Client makes to create a run, and records them."""

    requests: list[dict] = []
    status = 200

    def _reply(self, body: dict, status: int | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status or self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}") if length else {}
        entry = {"method": self.command, "path": urlparse(self.path).path, "query": parse_qs(urlparse(self.path).query),
                 "auth": self.headers.get("Authorization"), "cookie": self.headers.get("Cookie"), "body": body}
        KFPStub.requests.append(entry)
        return entry

    def do_GET(self) -> None:  # noqa: N802
        entry = self._record()
        if self.status != 200:
            return self._reply({"error": "unauthorized", "code": 16, "message": "login required"})
        self._reply({"experiments": []} if entry["path"].endswith("/experiments") else {})

    def do_POST(self) -> None:  # noqa: N802
        entry = self._record()
        if self.status != 200:
            return self._reply({"error": "unauthorized", "code": 16, "message": "login required"})
        if entry["path"] == "/apis/v2beta1/experiments":
            return self._reply({"experiment_id": "exp-123", "display_name": entry["body"].get("display_name")})
        if entry["path"] == "/apis/v2beta1/runs":
            return self._reply({"run_id": "run-456", "experiment_id": entry["body"].get("experiment_id"),
                                "display_name": entry["body"].get("display_name"), "state": "PENDING"})
        self._reply({}, 404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def kfp_api():  # noqa: ANN201
    KFPStub.requests, KFPStub.status = [], 200
    server = ThreadingHTTPServer(("127.0.0.1", 0), KFPStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_submit_sends_the_compiled_pipeline_with_auth_and_arguments(kfp_api: str) -> None:
    result = e4srec("submit", "--host", kfp_api, "--token", "tok-1", "--namespace", "team-a", "--experiment", "beauty",
                    "--input", "s3://data/raw/Beauty.txt", "--sasrec-epochs", "3", "--sasrec-loss", "ce")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "submitted run run-456" in result.stdout
    assert all(r["auth"] == "Bearer tok-1" for r in KFPStub.requests)
    created = [r for r in KFPStub.requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/experiments"]
    assert created and created[0]["body"]["display_name"] == "beauty" and created[0]["body"]["namespace"] == "team-a"
    (run,) = [r["body"] for r in KFPStub.requests if r["path"] == "/apis/v2beta1/runs"]
    assert run["experiment_id"] == "exp-123"
    params = run["runtime_config"]["parameters"]
    assert (params["input_uri"], params["sasrec_epochs"], params["sasrec_loss"]) == ("s3://data/raw/Beauty.txt", 3, "ce")
    spec = run["pipeline_spec"]
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "e4srec"  # the cluster profile's compile
    assert "kubernetes" in spec["platform_spec"]["platforms"]


def test_submit_reports_a_refusal_in_one_line(kfp_api: str) -> None:
    KFPStub.status = 401
    result = e4srec("submit", "--host", kfp_api, "--cookie", "authservice_session=abc", "--input", "s3://d/x.txt")
    assert result.returncode == 1 and f"submitting to {kfp_api} failed (HTTP 401)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert KFPStub.requests[0]["cookie"] == "authservice_session=abc"


@pytest.mark.timeout(600)
def test_rerun_one_stage_from_an_earlier_run(tiny_run: tuple[Path, Path, str]) -> None:
    cwd, run_dir, _ = tiny_run
    # the README's example, as written
    again = e4srec("rerun", "pretrain-sasrec", "--from", f"runs/{run_dir.name}", "--set", "loss=ce", "--set", "epochs=2",
                   cwd=cwd)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    (rerun_dir,) = (cwd / "runs").glob("e4srec-rerun-pretrain-sasrec-*")
    model = rerun_dir / "pretrain-sasrec" / "model"
    config = c.read_json(model / "config.json")
    assert config["train"]["loss"] == "ce" and config["train"]["epochs"] == 2
    assert config["item_map_sha256"] == c.read_json(run_dir / "prepare-data" / "data" / "manifest.json")["item_map_sha256"]
    assert f"Rerun outputs:     {rerun_dir}" in again.stdout
    e4 = e4srec("rerun", "train-e4srec", "--from", run_dir, "--set", "max_examples=16", "--set", "eval_users=10",
                "--set", "tracking=false", "--input-override", f"sasrec={model}", cwd=cwd)
    assert e4.returncode == 0, e4.stdout[-2000:] + e4.stderr[-2000:]
    bad = e4srec("rerun", "train-e4srec", "--from", run_dir, "--set", "epochz=2", cwd=cwd)
    assert bad.returncode == 1 and "--set 'epochz=2': expected KEY=VALUE with KEY one of" in bad.stderr


def test_rerun_submits_the_one_stage_pipeline_with_host(tiny_run: tuple[Path, Path, str], kfp_api: str) -> None:
    cwd, run_dir, _ = tiny_run
    result = e4srec("rerun", "pretrain-sasrec", "--from", run_dir, "--set", "epochs=3", "--host", kfp_api,
                    "--token", "tok-2", cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "submitted rerun of pretrain-sasrec: run run-456" in result.stdout
    assert all(r["auth"] == "Bearer tok-2" for r in KFPStub.requests)
    (run,) = [r["body"] for r in KFPStub.requests if r["path"] == "/apis/v2beta1/runs"]
    spec = run["pipeline_spec"]  # the local profile sets no Kubernetes options: no platform spec beside it
    assert spec["pipelineInfo"]["name"] == "e4srec-rerun-pretrain-sasrec"
    assert str(run_dir / "prepare-data" / "data") in json.dumps(spec)  # the importer reads the earlier output
