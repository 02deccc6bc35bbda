"""The pipeline: compiled YAML in sync, and a kfp.local run of both stages tracked in MLflow."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest
import yaml
from e4srec import contracts as c
from e4srec_pipelines import compile_pipeline
from helpers import DATA, REPO, e4srec


def test_committed_pipeline_yaml_is_in_sync_and_holds_no_credentials(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    # Credentials in the compiling environment must not reach the spec (nor change it).
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.setenv(var, f"leak-{var.lower()}-0123456789")
    text = compile_pipeline(tmp_path / "pipeline.yaml").read_text()
    assert "leak-" not in text
    assert text == (REPO / "pipeline.yaml").read_text(), "run `e4srec compile` and commit pipeline.yaml"
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # no AWS access key id of any kind


def test_compiled_pipeline_shape() -> None:
    spec = next(yaml.safe_load_all((REPO / "pipeline.yaml").read_text()))  # then the platform spec
    tasks = spec["root"]["dag"]["tasks"]
    assert {"prepare-data", "pretrain-sasrec", "condition-branches-1", "train-e4srec", "deploy"} <= set(tasks)
    gated = [t["triggerPolicy"]["condition"] for t in all_tasks(spec).values() if "triggerPolicy" in t]
    assert any("deploy-Output" in condition for condition in gated)  # the gate is in the DAG
    assert set(tasks["train-e4srec"]["dependentTasks"]) == {"prepare-data", "pretrain-sasrec", "condition-branches-1"}
    assert tasks["pretrain-sasrec"]["dependentTasks"] == ["prepare-data"]
    assert {"input_uri", "instructions_uri", "backbone"} <= set(spec["root"]["inputDefinitions"]["parameters"])
    # instruction-tune runs under dsl.If / dsl.Else on the pipeline parameter, its backbone artifact chosen by dsl.OneOf
    branches = spec["components"]["comp-condition-branches-1"]["dag"]["tasks"]
    conditions = {t["triggerPolicy"]["condition"] for t in branches.values()}
    assert any("instruction_tune_backbone" in cond for cond in conditions), conditions
    assert "backbone" in spec["root"]["outputDefinitions"]["artifacts"]
    # the report reads the alias history: in the promoting branch only after promote-champion
    reports = {name: t for c in spec["components"].values() for name, t in c.get("dag", {}).get("tasks", {}).items()
               if t["componentRef"]["name"].startswith("comp-report")}
    assert sorted(t.get("dependentTasks", []) for t in reports.values()) == [[], ["promote-champion"]]
    assert spec["components"]["comp-train-e4srec"]["inputDefinitions"]["artifacts"]["backbone"]
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for executor in spec["deploymentSpec"]["executors"].values():  # the image is the package's own version
        assert executor["container"]["image"] in (f"registry.example.com/e4srec/e4srec-cpu:{version}",
                                                  f"registry.example.com/e4srec/e4srec-cuda:{version}")
        assert "pip install" not in " ".join(executor["container"]["command"])  # kfp and e4srec are in the image


def test_local_run_of_the_pipeline(tmp_path: Path, beauty_slice: Path, monkeypatch) -> None:  # noqa: ANN001
    db = tmp_path / "mlflow.db"
    result = e4srec(
        "run", "--input", beauty_slice, "--pipeline-root", tmp_path / "runs", "--sasrec-epochs", "2",
        "--sasrec-loss", "ce", "--instructions", DATA / "instructions.json", "--backbone", "tiny",
        "--instruction-tune-backbone", "--instruct-max-examples", "8", "--e4srec-max-examples", "64",
        "--e4srec-eval-users", "100", "--e4srec-batch-size", "8",
        cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SASRec        test   full" in result.stdout and "mlflow ui --backend-store-uri" in result.stdout
    (run_dir,) = (tmp_path / "runs").glob("e4srec-*")
    data = c.load_sequence_data(run_dir / "prepare-data" / "data")
    model = run_dir / "pretrain-sasrec" / "model"
    assert c.read_json(model / "config.json")["item_map_sha256"] == data.item_map_sha256
    assert c.read_json(model / c.METRICS)["train/epochs"] == 2
    backbone = c.read_json(run_dir / "instruction-tune" / "backbone" / "backbone.json")
    assert backbone["backbone"] == "tiny" and backbone["adapter"] == "adapter"
    assert f"LLM backbone:    {run_dir / 'instruction-tune' / 'backbone'}" in result.stdout

    # the environment, not mlflow.set_tracking_uri: that one is process-global and would leak into later tests
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["e4srec"])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert len(parents) == 1 and parents.iloc[0]["tags.kfp.run_name"].startswith("e4srec-")
    parent = parents.iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    assert sorted(children["tags.e4srec.stage"]) == ["deploy", "instruction-tune", "prepare-data",
                                                     "pretrain-sasrec", "report", "train-e4srec"]
    report = children[children["tags.e4srec.stage"] == "report"].iloc[0]
    pages = {a.path for a in mlflow.MlflowClient().list_artifacts(report["run_id"], "report")}
    assert "report/report.html" in pages
    assert (run_dir / "report" / "report" / "report.html").is_file() and "run report:" in result.stdout
    page = (run_dir / "report" / "report" / "report.html").read_text()
    assert f"<h1>E4SRec run report: {parent['tags.kfp.run_name']}</h1>" in page  # titled with the pipeline run
    trained = c.read_json(run_dir / "train-e4srec" / "model" / "config.json")
    assert trained["backbone"]["backbone"] == "tiny" and trained["instruct_adapter"] == "instruct_adapter"
    assert "E4SRec        test   full" in result.stdout
    assert set(children["status"]) == {"FINISHED"} and parent["status"] == "FINISHED"
    sasrec = children[children["tags.e4srec.stage"] == "pretrain-sasrec"].iloc[0]
    assert sasrec["params.loss"] == "ce" and sasrec["params.epochs"] == "2"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(sasrec["run_id"], "plots")}
    assert artifacts == {"plots/training_curves.png", "plots/metrics_by_length.png"}


def test_local_run_skipping_instruction_tune(tiny_run: tuple[Path, Path, str]) -> None:
    cwd, run_dir, stdout = tiny_run
    (descriptor,) = run_dir.glob("instruction-tune*/backbone/backbone.json")
    assert c.read_json(descriptor)["skipped"] is True
    assert not (cwd / "mlflow.db").exists()  # --no-tracking, though MLFLOW_TRACKING_URI pointed there
    assert "E4SRec        test   full" in stdout and "Registry:" not in stdout  # nothing registered untracked


def executor_of(spec: dict, task: dict) -> dict:
    component = spec["components"][task["componentRef"]["name"]]
    return spec["deploymentSpec"]["executors"][component["executorLabel"]]


def all_tasks(spec: dict) -> dict[str, dict]:
    """Every task of the root DAG and of the condition sub-DAGs, by name."""
    found = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        found.update(comp.get("dag", {}).get("tasks", {}))
    return found


def test_cluster_profile_settings_are_in_the_compiled_yaml() -> None:
    spec, platform = list(yaml.safe_load_all((REPO / "pipeline.yaml").read_text()))
    tasks = all_tasks(spec)
    assert spec["defaultPipelineRoot"] == "s3://e4srec-pipelines/root"
    e4srec_exec = executor_of(spec, tasks["train-e4srec"])["container"]
    assert e4srec_exec["image"].startswith("registry.example.com/e4srec/e4srec-cuda:")
    accelerator = e4srec_exec["resources"]["accelerator"]
    assert (accelerator["resourceCount"], accelerator["resourceType"]) == ("1", "nvidia.com/gpu")
    data_exec = executor_of(spec, tasks["prepare-data"])["container"]
    assert "accelerator" not in data_exec.get("resources", {}) and "e4srec-cpu" in data_exec["image"]
    env = {e["name"]: e["value"] for e in data_exec["env"]}
    assert env["MLFLOW_TRACKING_URI"].startswith("http://mlflow.") and env["AWS_ENDPOINT_URL"]
    assert tasks["prepare-data"]["cachingOptions"] == {"enableCache": True}
    assert not tasks["deploy"]["cachingOptions"].get("enableCache")
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    gpu_exec = k8s[spec["components"][tasks["train-e4srec"]["componentRef"]["name"]]["executorLabel"]]
    assert gpu_exec["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    secrets = {s["secretName"]: {m["secretKey"]: m["envVar"] for m in s["keyToEnv"]} for s in gpu_exec["secretAsEnv"]}
    assert secrets["e4srec-s3-credentials"] == {"access-key": "AWS_ACCESS_KEY_ID", "secret-key": "AWS_SECRET_ACCESS_KEY"}


    # production pod settings (kfp and kfp-kubernetes, from the profile's pods, image_pull_secrets, checkpoints)
    resources = e4srec_exec["resources"]
    assert (resources["resourceCpuRequest"], resources["resourceMemoryRequest"], resources["resourceMemoryLimit"]) == \
        ("8", "64Gi", "96Gi")
    assert tasks["train-e4srec"]["retryPolicy"]["maxRetryCount"] == 2 and "retryPolicy" not in tasks["promote-champion"]
    assert gpu_exec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert gpu_exec["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory",
                                           "sizeLimit": "16Gi"}]
    assert [s["secretName"] for s in gpu_exec["imagePullSecret"]] == ["e4srec-registry"]
    assert [(m["constant"], m["mountPath"]) for m in gpu_exec["pvcMount"]] == [("e4srec-checkpoints", "/checkpoints")]
    given = tasks["train-e4srec"]["inputs"]["parameters"]  # a retried pod resumes from the PVC
    assert given["checkpoint_dir"]["runtimeValue"]["constant"] == "/checkpoints/{run_id}/train-e4srec"
    assert given["resume"]["runtimeValue"]["constant"] is True
    data_k8s = k8s[spec["components"][tasks["prepare-data"]["componentRef"]["name"]]["executorLabel"]]
    assert "tolerations" not in data_k8s and "pvcMount" not in data_k8s


def test_a_profile_with_an_unknown_pod_setting_is_refused_in_one_line(tmp_path: Path) -> None:
    from e4srec.errors import E4SRecError
    from e4srec_pipelines.profiles import load_profile

    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\nimage: i\ngpu_image: g\npods:\n  train-e4srec: {memory: 8Gi}\n")
    with pytest.raises(E4SRecError, match=r"pods.train-e4srec: unknown setting\(s\) memory \(known: cpu_request"):
        load_profile(bad)
