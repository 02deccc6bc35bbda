"""Submit to Kubeflow (against a loopback stand-in for the KFP API) and rerun one stage locally."""

from __future__ import annotations

from pathlib import Path

import pytest
from e4srec import contracts as c
from helpers import e4srec
from kfp_stub import KFPStub, serve


@pytest.fixture()
def kfp_api():  # noqa: ANN201
    with serve() as url:
        yield url


def test_submit_sends_the_compiled_pipeline_with_auth_and_arguments(kfp_api: str) -> None:
    result = e4srec("submit", "--host", kfp_api, "--token", "tok-1", "--namespace", "team-a", "--kfp-experiment", "beauty",
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
    # the backend reads the root from the run, never from the spec (driver/root_dag.go RootDAG)
    assert run["runtime_config"]["pipeline_root"] == "s3://e4srec-pipelines/root"  # the cluster profile's
    assert "pipeline root s3://e4srec-pipelines/root" in result.stdout
    spec = run["pipeline_spec"]
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "e4srec"  # the cluster profile's compile
    assert "kubernetes" in spec["platform_spec"]["platforms"]


def test_submit_refuses_an_older_backend_in_one_line(kfp_api: str) -> None:
    KFPStub.tag_name = "2.4.1"
    result = e4srec("submit", "--host", kfp_api, "--input", "s3://d/x.txt")
    assert result.returncode == 1 and f"{kfp_api} runs Kubeflow Pipelines 2.4.1; this pipeline needs 2.17.0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not [r for r in KFPStub.requests if r["path"] == "/apis/v2beta1/runs"]


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


def test_rerun_takes_the_parameters_the_earlier_run_gave_the_stage(tiny_run: tuple[Path, Path, str]) -> None:
    from e4srec_pipelines.profiles import load_profile
    from e4srec_pipelines.submit import earlier_run, rerun_pipeline, stage_components

    _, run_dir, _ = tiny_run  # `e4srec run ... --e4srec-eval-users 50 --no-tracking`
    run = earlier_run(str(run_dir))
    deploy = stage_components(load_profile("local"))["deploy"]
    inherited = run.stage_parameters("deploy", deploy)
    assert (inherited["eval_users"], inherited["seed"], inherited["tracking"]) == (50, 42, False)
    said: list[str] = []
    rerun_pipeline("deploy", run, ["eval_users=20"], report=said.append)
    assert said[0].startswith(f"rerun deploy with the parameters run {run_dir.name} gave it: ")
    assert "seed=42" in said[0] and said[0].endswith("; set here: eval_users=20")


def test_rerun_with_host_takes_a_run_id_and_refuses_the_local_profile(tiny_run: tuple[Path, Path, str],
                                                                       kfp_api: str) -> None:
    cwd, run_dir, _ = tiny_run
    missing = e4srec("rerun", "pretrain-sasrec", "--from", "no-such-run", "--host", kfp_api, "--token", "tok-2", cwd=cwd)
    assert missing.returncode == 1 and f"run no-such-run: not found at {kfp_api}" in missing.stderr
    assert all(r["auth"] == "Bearer tok-2" for r in KFPStub.requests)
    refused = e4srec("rerun", "pretrain-sasrec", "--from", run_dir, "--host", kfp_api, "--profile", "local", cwd=cwd)
    assert refused.returncode == 1 and "rerun --host runs on Kubeflow" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_submit_upload_makes_a_pipeline_then_new_versions_and_runs_them(kfp_api: str) -> None:
    first = e4srec("submit", "--host", kfp_api, "--upload", "e4srec-beauty", "--input", "s3://d/Beauty.txt")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "uploaded pipeline 'e4srec-beauty' version" in first.stdout and "(pl-1 / pl-1-v1)" in first.stdout
    second = e4srec("submit", "--host", kfp_api, "--upload", "e4srec-beauty", "--input", "s3://d/Beauty.txt")
    assert second.returncode == 0 and "(pl-1 / pl-1-v2)" in second.stdout  # the same pipeline, a new version
    uploads = [r for r in KFPStub.requests if r["path"].startswith("/apis/v2beta1/pipelines/upload")]
    assert [r["path"].rsplit("/", 1)[-1] for r in uploads] == ["upload", "upload_version"]
    assert all(r["body"]["has_pipeline_spec"] for r in uploads)
    runs = [r["body"] for r in KFPStub.requests if r["path"] == "/apis/v2beta1/runs"]
    assert [r["pipeline_version_reference"] for r in runs] == [
        {"pipeline_id": "pl-1", "pipeline_version_id": "pl-1-v1"}, {"pipeline_id": "pl-1", "pipeline_version_id": "pl-1-v2"}]
    assert runs[0]["runtime_config"]["parameters"]["input_uri"] == "s3://d/Beauty.txt"
    assert runs[0]["runtime_config"]["pipeline_root"] == "s3://e4srec-pipelines/root"


def test_submit_schedule_creates_a_recurring_run(kfp_api: str) -> None:
    result = e4srec("submit", "--host", kfp_api, "--schedule", "0 3 * * 1", "--input", "s3://d/Beauty.txt")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "submitted recurring run rr-789" in result.stdout
    (made,) = [r["body"] for r in KFPStub.requests if r["path"] == "/apis/v2beta1/recurringruns"]
    assert made["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"  # KFP's cron has seconds first
    assert made["max_concurrency"] == "1" or made["max_concurrency"] == 1
    spec = made["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "e4srec"
    # a schedule reads the same input URI each time: no task may answer from the cache
    tasks = [t for c in [spec["root"], *spec["components"].values()] for t in c.get("dag", {}).get("tasks", {}).values()]
    assert tasks and not any(t.get("cachingOptions", {}).get("enableCache") for t in tasks)
    assert made["runtime_config"]["parameters"]["input_uri"] == "s3://d/Beauty.txt"
    bad = e4srec("submit", "--host", kfp_api, "--schedule", "every monday", "--input", "s3://d/Beauty.txt")
    assert bad.returncode == 1 and "a cron expression has 5 fields" in bad.stderr


def test_rerun_deploy_moves_the_champion_as_the_pipeline_does(tiny_run: tuple[Path, Path, str], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from e4srec import registry

    cwd, run_dir, _ = tiny_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = e4srec("rerun", "deploy", "--from", run_dir, "--set", "tracking=true", "--set", "eval_users=20",
                    "--set", "registered_model=e4srec-rerun", cwd=cwd, env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    champion = registry.version_for("e4srec-rerun", registry.CHAMPION)  # no champion before: the gate promotes
    assert champion is not None
    (move,) = registry.alias_history("e4srec-rerun", registry.CHAMPION)
    assert move["to"] == str(champion.version) and "no champion yet" in move["reason"]
    import mlflow  # the rerun is a pipeline run of its own, linked to the run it came from

    source = c.read_json(run_dir / "pipeline_run.json")["run_id"]
    (parent,) = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                   filter_string=f"tags.`e4srec.rerun_of` = '{source}'")
    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert [r.info.run_name for r in children] == ["deploy"] and parent.info.run_name.startswith("rerun-deploy-of-")
    unknown = e4srec("rerun", "deploy", "--from", run_dir, "--input-override", "sasrek=/x", cwd=cwd)
    assert unknown.returncode == 1 and "deploy has no input 'sasrek'" in unknown.stderr
