"""A loopback stand-in for the Kubeflow Pipelines v2beta1 REST API, answering in the real API's JSON
shapes (kubeflow/pipelines backend/api/v2beta1/run.proto, experiment.proto: snake_case field names,
int64 as strings) the calls kfp.Client makes: healthz, experiments, create and get a run, upload a
pipeline and its versions (multipart, as backend/src/apiserver/main.go routes /pipelines/upload),
list them, and create a recurring run (recurring_run.proto)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


class KFPStub(BaseHTTPRequestHandler):
    """Records every request; `runs` holds the runs GET /apis/v2beta1/runs/{id} returns."""

    requests: list[dict] = []
    runs: dict[str, dict[str, Any]] = {}
    pipelines: dict[str, dict[str, Any]] = {}  # pipeline id -> {"pipeline": ..., "versions": [...]}
    status = 200
    tag_name = "2.17.0"  # what healthz says (backend/src/apiserver/main.go newHealthzResponse)

    def _reply(self, body: dict, status: int | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status or self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if "multipart/form-data" in (self.headers.get("Content-Type") or ""):
            body = {"multipart_bytes": len(raw), "has_pipeline_spec": b"pipelineInfo" in raw}
        else:
            body = json.loads(raw or b"{}")
        entry = {"method": self.command, "path": urlparse(self.path).path, "query": parse_qs(urlparse(self.path).query),
                 "auth": self.headers.get("Authorization"), "cookie": self.headers.get("Cookie"), "body": body}
        KFPStub.requests.append(entry)
        return entry

    def do_GET(self) -> None:  # noqa: N802
        entry = self._record()
        if self.status != 200:
            return self._reply({"error": "unauthorized", "code": 16, "message": "login required"})
        if entry["path"] == "/apis/v2beta1/healthz":
            return self._reply({"commit_sha": "4a3592cb", "tag_name": self.tag_name, "multi_user": False,
                                "pipeline_store": "database"})
        if entry["path"] == "/apis/v2beta1/pipelines":
            predicate = json.loads(entry["query"].get("filter", ["{}"])[0]).get("predicates", [{}])[0]
            wanted = predicate.get("stringValue", predicate.get("string_value"))  # the API takes either
            found = [p["pipeline"] for p in self.pipelines.values() if wanted in (None, p["pipeline"]["display_name"])]
            return self._reply({"pipelines": found, "total_size": len(found)} if found else {})
        if entry["path"].startswith("/apis/v2beta1/pipelines/") and entry["path"].endswith("/versions"):
            versions = self.pipelines.get(entry["path"].split("/")[4], {}).get("versions", [])
            return self._reply({"pipeline_versions": versions[::-1], "total_size": len(versions)})
        if entry["path"].startswith("/apis/v2beta1/runs/"):
            run = self.runs.get(entry["path"].rsplit("/", 1)[-1])
            if run is None:  # google.rpc.Status, as the API server answers NotFound
                return self._reply({"error": "run not found", "code": 5, "message": "run not found"}, 404)
            return self._reply(run)
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
        if entry["path"] in ("/apis/v2beta1/pipelines/upload", "/apis/v2beta1/pipelines/upload_version"):
            name = entry["query"]["name"][0]
            if entry["path"].endswith("/upload"):
                pid = f"pl-{len(self.pipelines) + 1}"
                pipeline = {"pipeline_id": pid, "display_name": name, "created_at": "2026-11-30T12:00:00Z"}
                self.pipelines[pid] = {"pipeline": pipeline, "versions": []}
            else:
                pid = entry["query"]["pipelineid"][0]
            versions = self.pipelines[pid]["versions"]
            version = {"pipeline_id": pid, "pipeline_version_id": f"{pid}-v{len(versions) + 1}", "display_name": name,
                       "created_at": "2026-11-30T12:00:00Z"}
            versions.append(version)
            return self._reply(self.pipelines[pid]["pipeline"] if entry["path"].endswith("/upload") else version)
        if entry["path"] == "/apis/v2beta1/recurringruns":
            return self._reply({**entry["body"], "recurring_run_id": "rr-789", "status": "ENABLED",
                                "created_at": "2026-11-30T12:00:00Z"})
        self._reply({}, 404)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serve() -> Iterator[str]:
    """The stand-in on a free loopback port, fresh records; yields its URL."""
    KFPStub.requests, KFPStub.runs, KFPStub.status, KFPStub.tag_name = [], {}, 200, "2.17.0"
    KFPStub.pipelines = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), KFPStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def api_run(run_id: str, display_name: str, pipeline_spec: dict, parameters: dict, pipeline_root: str,
            tasks: dict[str, str]) -> dict[str, Any]:
    """A V2beta1Run as GET /apis/v2beta1/runs/{id} returns it; `tasks` maps task name -> RuntimeState."""
    details = [{"run_id": run_id, "task_id": f"task-{i}", "display_name": name, "state": state,
                "execution_id": str(100 + i), "create_time": "2026-11-30T12:00:00Z",
                "start_time": "2026-11-30T12:00:00Z", "end_time": "2026-11-30T12:01:00Z",
                "outputs": {}, "inputs": {}, "child_tasks": []}
               for i, (name, state) in enumerate(sorted(tasks.items()))]
    return {"experiment_id": "exp-123", "run_id": run_id, "display_name": display_name, "storage_state": "AVAILABLE",
            "pipeline_spec": pipeline_spec, "runtime_config": {"parameters": parameters, "pipeline_root": pipeline_root},
            "service_account": "pipeline-runner", "created_at": "2026-11-30T12:00:00Z",
            "scheduled_at": "2026-11-30T12:00:00Z", "finished_at": "2026-11-30T12:05:00Z", "state": "SUCCEEDED",
            "run_details": {"pipeline_context_id": "1", "pipeline_run_context_id": "2", "task_details": details}}
