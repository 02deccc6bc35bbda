"""The committed pipeline.yaml, run as the KFP v2 backend runs it (tests/kfp_backend/harness.py), with
its artifacts on S3 (SeaweedFS) under an s3:// pipeline root: every task's own command line from the
compiled spec, in a subprocess, with nothing of ours in between."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from helpers import REPO, e4srec
from kfp_stub import KFPStub, api_run, serve
from kfp_backend.harness import CACHED, COMPLETE, NOT_TRIGGERED, Backend, HarnessError, cel_condition
from s3server import ACCESS_KEY, BUCKET, SECRET_KEY

ROOT = f"s3://{BUCKET}/kfp-root"
PARAMETERS = {"backbone": "tiny", "sasrec_epochs": 1, "e4srec_max_examples": 32, "e4srec_eval_users": 50,
              "e4srec_batch_size": 8, "device": "cpu"}


@pytest.fixture(scope="module")
def backend(s3, beauty_slice, tmp_path_factory):  # noqa: ANN001, ANN201
    """The backend with the cluster profile's services pointed here, and the beauty slice uploaded."""
    work = tmp_path_factory.mktemp("kfp-backend")
    from e4srec import storage

    storage.client().upload_file(str(beauty_slice), BUCKET, "inputs/beauty.txt")
    secrets = {"e4srec-s3-credentials": {"access-key": ACCESS_KEY, "secret-key": SECRET_KEY}}
    overrides = {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "AWS_ENDPOINT_URL": s3.endpoint,
                 "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
    return Backend(REPO / "pipeline.yaml", work, secrets=secrets, env_overrides=overrides, s3_endpoint=s3.endpoint,
                   s3_credentials=(ACCESS_KEY, SECRET_KEY))


@pytest.fixture(scope="module")
def two_runs(backend):  # noqa: ANN001, ANN201
    """Two runs with the same inputs; the second should reuse the cached stages."""
    params = {"input_uri": f"s3://{BUCKET}/inputs/beauty.txt", **PARAMETERS}
    first = backend.run(params, pipeline_root=ROOT, run_name="first")
    second = backend.run(params, pipeline_root=ROOT, run_name="second")
    return first, second


def test_the_compiled_pipeline_runs_on_the_backend_with_artifacts_in_its_layout(backend, two_runs) -> None:  # noqa: ANN001
    first, _ = two_runs
    states = first.states()
    ran = {"prepare-data", "pretrain-sasrec", "instruction-tune-skipped", "train-e4srec", "deploy", "promote-champion",
           "report"}  # the first model becomes champion (when_no_champion=promote), then the report reads the alias
    assert {name: states[name] for name in ran} == dict.fromkeys(ran, COMPLETE)
    # tuning off, batch-recommend off, the gate said promote: those branches' tasks never started
    assert not {"instruction-tune", "batch-recommend", "report-2"} & set(states)
    assert NOT_TRIGGERED in states.values()
    layout = re.compile(rf"{ROOT}/e4srec/{first.run_id}/(?P<task>[a-z0-9-]+)/[0-9a-f-]{{36}}/(?P<output>\w+)")
    for name in ran:
        for output, (artifact,) in first.task(name).artifacts.items():
            m = layout.fullmatch(artifact["uri"])
            assert m and m["task"] == name and m["output"] == output, artifact["uri"]
    model = first.task("train-e4srec").artifacts["model"][0]["uri"]
    keys = backend.keys(model)
    assert any(k.endswith("/metrics.json") for k in keys) and any("/adapter/" in k for k in keys)
    assert not [k for k in backend.keys(f"{ROOT}/e4srec/{first.run_id}") if k.endswith("_E4SREC_COMPLETE.json")]


def test_every_stage_of_a_run_logs_under_one_mlflow_parent_keyed_by_the_pod_label(backend, two_runs,  # noqa: ANN001
                                                                                  monkeypatch) -> None:  # noqa: ANN001
    import mlflow

    first, second = two_runs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{backend.workdir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["e4srec"])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()].set_index("tags.e4srec.pipeline_run_id")
    assert set(parents.index) == {first.run_id, second.run_id}
    assert parents.loc[first.run_id, "tags.kfp.run_name"] == "first"  # named by deploy, the first uncached stage
    assert parents.loc[first.run_id, "tags.mlflow.runName"] == "first"
    children = runs[runs["tags.mlflow.parentRunId"] == parents.loc[first.run_id, "run_id"]]
    assert sorted(children["tags.e4srec.stage"]) == ["deploy", "instruction-tune", "prepare-data", "pretrain-sasrec",
                                                     "report", "train-e4srec"]
    again = runs[runs["tags.mlflow.parentRunId"] == parents.loc[second.run_id, "run_id"]]
    assert sorted(again["tags.e4srec.stage"]) == ["deploy", "report"]  # the cached stages did not run again


def test_a_second_run_with_the_same_inputs_hits_the_cache(two_runs) -> None:  # noqa: ANN001
    first, second = two_runs
    states = second.states()
    assert states["prepare-data"] == CACHED and states["pretrain-sasrec"] == CACHED
    assert second.task("pretrain-sasrec").artifacts == first.task("pretrain-sasrec").artifacts
    assert states["train-e4srec"] == CACHED and states["instruction-tune-skipped"] == CACHED
    assert states["deploy"] == COMPLETE  # uncached: the registry-facing stages
    assert COMPLETE in (states.get("report"), states.get("report-2"))  # the report of whichever way the gate went
    print(f"harness: first run {first.seconds:.0f} s, second {second.seconds:.0f} s")


def test_rerun_finds_a_cluster_runs_outputs_and_parameters_through_the_api(two_runs) -> None:  # noqa: ANN001
    first, second = two_runs
    docs = list(yaml.safe_load_all((REPO / "pipeline.yaml").read_text()))
    spec = {"pipeline_spec": docs[0], "platform_spec": docs[1]}  # as the API returns a submitted package's
    state = {COMPLETE: "SUCCEEDED", CACHED: "SKIPPED", NOT_TRIGGERED: "SKIPPED"}  # v2beta1 has no CACHED state
    with serve() as url:
        for run, name in ((first, "first"), (second, "second")):
            KFPStub.runs[run.run_id] = api_run(run.run_id, name, spec, run.parameters, ROOT,
                                               {task: state[s] for task, s in run.states().items()})
        result = e4srec("rerun", "deploy", "--from", first.run_id, "--host", url, "--set", "min_margin=0.01")
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert f"rerun deploy with the parameters run {first.run_id} gave it: " in result.stdout
        assert "eval_users=50" in result.stdout and "set here: min_margin=0.01" in result.stdout
        (submitted,) = [r["body"] for r in KFPStub.requests if r["path"] == "/apis/v2beta1/runs"]
        text = json.dumps(submitted["pipeline_spec"])
        assert first.task("train-e4srec").artifacts["model"][0]["uri"] in text
        assert first.task("prepare-data").artifacts["data"][0]["uri"] in text
        cached = e4srec("rerun", "deploy", "--from", second.run_id, "--host", url)
        assert cached.returncode == 1 and "was skipped (a cache hit, its model then belonging to the run" in cached.stderr


def test_the_harness_helpers() -> None:
    from kfp_backend.harness import _number, _order

    assert cel_condition("int(inputs.parameter_values['k']) > 0", {"k": 0.0}) is False
    assert cel_condition("!(inputs.parameter_values['b'] == true)", {"b": False}) is True
    assert cel_condition("inputs.parameter_values['s'] == 'a' || false", {"s": "a"}) is True
    with pytest.raises(HarnessError, match="outside the CEL subset"):
        cel_condition("size(inputs.parameter_values['x']) > 0", {"x": "a"})
    assert [_number(3.0), _number(0.5), _number(1e-3)] == ["3", "0.5", "0.001"]  # strconv.FormatFloat 'f', -1
    tasks = {"b": {"inputs": {"artifacts": {"x": {"taskOutputArtifact": {"producerTask": "a"}}}}},
             "a": {}, "c": {"dependentTasks": ["b"]}}
    assert _order(tasks) == ["a", "b", "c"]
