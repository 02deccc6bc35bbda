"""The promotion gate against real runs and registrations: a whole pipeline run (no champion yet: the better
of its two crowned), then `rerun deploy` pipelines over trained models (a better run promoted, a worse and an
equal one held), rollback, the alias history, another item map (held, promotion refused, forced), and
all-or-nothing registration.

The gate's point is the models it compares, not how they were trained: one whole `e4srec run` (whose
pipeline takes the promoting branch under dsl.If on the verdict) provides the first run's models; a
stronger E4SRec is trained once, in-process, on that run's data and SASRec; every later "run" is an
`e4srec rerun deploy` (a one-stage pipeline with the same dsl.If -> promote-champion branch) over those
folders. Registry commands run through the CLI's entry point in this process (no interpreter start each)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from e4srec import contracts as c
from e4srec import registry
from e4srec.errors import E4SRecError
from e4srec.stages import deploy, prepare_data, pretrain_sasrec
from e4srec.stages import train_e4srec as stage
from helpers import DATA, e4srec, write_slice

NAME = "e4srec-beauty_800"
# Full-ranking NDCG of a tiny random backbone over 800 users is too noisy to order models reliably;
# the sampled protocol separates these runs.
METRIC = "test/sampled/NDCG@10"
GATE = ("--gate-metric", METRIC)
WEAK = ("--e4srec-lr", "1e-7", "--e4srec-max-examples", "64")  # barely trained: scores close to its own SASRec
# Beats its SASRec on the slice by a wide margin in one epoch. Its own evaluation uses 50 users: the gate
# scores all 800.
STRONG = {"lr": 5e-3, "epochs": 1, "batch_size": 32, "eval_users": 50}


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    """`e4srec ARGS` through the CLI's entry point in this process: its exit code, stdout and stderr, as
    `helpers.e4srec` returns them, without a new interpreter's ten seconds of imports per call."""
    from e4srec.cli import main

    out, err = io.StringIO(), io.StringIO()
    level, saved = logging.getLogger("mlflow").level, os.environ.get("MLFLOW_LOGGING_LEVEL")
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:  # main sets both for its process; this one goes on
        logging.getLogger("mlflow").setLevel(level)
        if saved is None:
            os.environ.pop("MLFLOW_LOGGING_LEVEL", None)
        else:
            os.environ["MLFLOW_LOGGING_LEVEL"] = saved
    return subprocess.CompletedProcess(["e4srec", *map(str, args)], code, out.getvalue(), err.getvalue())


def pipeline_run(tmp_path: Path, raw: Path, *args: str) -> tuple[Path, dict]:
    """One whole `e4srec run` on the tiny backbone: (its run folder, the deploy verdict)."""
    result = e4srec("run", "--input", raw, "--pipeline-root", tmp_path / "runs", "--sasrec-epochs", "2",
                    "--backbone", "tiny", "--e4srec-batch-size", "32", *GATE, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = max((tmp_path / "runs").glob("e4srec-2*"))
    verdict = c.read_json(run_dir / "deploy" / "verdict" / "verdict.json")
    assert f"gate (800 users): {'PROMOTE' if verdict['promote'] else 'hold'}" in result.stdout
    return run_dir, verdict


def rerun_deploy(tmp_path: Path, run_dir: Path, *args: str) -> dict:
    """`e4srec rerun deploy` on an earlier run's outputs (`--input-override model=...`: another E4SRec beside
    that run's SASRec and data); a pipeline run of its own that promotes as the pipeline does. The verdict."""
    result = e4srec("rerun", "deploy", "--from", run_dir, "--pipeline-root", tmp_path / "runs", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rerun_dir = max((tmp_path / "runs").glob("e4srec-rerun-deploy-*"))
    return c.read_json(rerun_dir / "deploy" / "verdict" / "verdict.json")


def champion() -> str:
    return str(registry.version_for(NAME, "champion").version)


def test_gate_over_four_runs_then_rollback_and_history(tmp_path: Path, beauty_slice: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # run 1, a whole pipeline: with no champion yet, the better of the run's two becomes champion. A barely
    # trained E4SRec starts close to its SASRec (its item head starts from the SASRec table): the two score
    # close, and on this machine SASRec wins (0.0498 against 0.0493), so which one wins is read, not assumed.
    run1, r1 = pipeline_run(tmp_path, beauty_slice, *WEAK)
    first = "e4srec" if r1["scores"]["e4srec"] > r1["scores"]["sasrec"] else "sasrec"
    assert r1["versions"] == {"e4srec": "1", "sasrec": "2"} and r1["candidate"] == first and r1["promote"], r1
    assert champion() == r1["versions"][first] and "no champion yet" in r1["reason"]
    assert ("E4SRec beats its SASRec" if first == "e4srec" else "E4SRec does not beat its SASRec") in r1["reason"]
    best = r1["scores"][first]
    label = {"e4srec": "E4SRec", "sasrec": "SASRec"}[first]
    # run 2, better: a trained E4SRec (on run 1's data and SASRec) beats its SASRec and the champion
    strong = tmp_path / "strong"
    stage.run(stage.TrainE4SRecConfig(device="cpu", **STRONG), run1 / "prepare-data" / "data",
              run1 / "pretrain-sasrec" / "model", "tiny", strong, progress=False)
    r2 = rerun_deploy(tmp_path, run1, "--input-override", f"model={strong}")
    assert r2["scores"]["sasrec"] == r1["scores"]["sasrec"] and r2["champion_value"] == best, r2
    assert r2["scores"]["e4srec"] > best and r2["candidate"] == "e4srec" and r2["promote"], r2
    assert r2["champion_kind"] == first and champion() == "3"
    for needle in (f"E4SRec {r2['scores']['e4srec']:.5f}", f"SASRec {r2['scores']['sasrec']:.5f}",
                   f"champion v{r1['versions'][first]} ({label}) {best:.5f}", "E4SRec beats the champion"):
        assert needle in r2["reason"], r2["reason"]
    # run 3, worse: run 1's models deployed again; its candidate does not beat the E4SRec champion
    r3 = rerun_deploy(tmp_path, run1)
    assert r3["scores"] == r1["scores"] and r3["champion_value"] == r2["scores"]["e4srec"] and not r3["promote"], r3
    assert champion() == "3" and str(registry.version_for(NAME, "challenger").version) == r3["challenger_version"]
    # run 4, equal: run 2's models again score exactly the champion's value: equal does not beat
    r4 = rerun_deploy(tmp_path, run1, "--input-override", f"model={strong}")
    assert r4["scores"] == r2["scores"] and r4["scores"]["e4srec"] == r4["champion_value"] and not r4["promote"], r4
    assert "E4SRec does not beat the champion" in r4["reason"] and champion() == "3"

    rolled = cli("promote", NAME, "--rollback")
    assert rolled.returncode == 0, rolled.stderr
    was = r1["versions"][first]
    assert f"champion: version 3 -> {was}  (rollback from version 3" in rolled.stdout and champion() == was
    history = registry.alias_history(NAME, "champion")
    assert [(m["from"], m["to"], m["forced"]) for m in history] == [(None, was, False), (was, "3", False),
                                                                    ("3", was, False)]
    assert all(m["who"] and m["when"] and m["reason"] for m in history)
    assert history[1]["metrics"][METRIC] == pytest.approx(r2["scores"]["e4srec"])
    challengers = [m["to"] for m in registry.alias_history(NAME, "challenger")]
    assert challengers == [was, "3", r3["challenger_version"], "7"]
    listed = cli("promote", NAME, "--history")
    assert listed.returncode == 0 and len(listed.stdout.strip().splitlines()) == 7  # 4 challenger + 3 champion
    print(listed.stdout)  # pytest -s shows the alias history
    runs = cli("runs")  # the four pipeline runs, newest first, with their verdicts and registered versions
    assert runs.returncode == 0, runs.stderr
    rows = [line.split() for line in runs.stdout.splitlines()[1:] if line[:4].isdigit()]
    assert [row[2] for row in rows] == ["FINISHED"] * 4 and [row[6] for row in rows] == ["hold", "hold", "promote",
                                                                                            "promote"], runs.stdout
    assert [row[7].startswith("rerun-deploy-of-") for row in rows] == [True, True, True, False], runs.stdout
    assert f"{NAME} v{was} {first} (champion)" in runs.stdout and f"{NAME} v3 e4srec" in runs.stdout, runs.stdout
    kinds = {v.version: v.tags["kind"] for v in registry.client().search_model_versions(f"name = '{NAME}'")}
    assert {str(k): v for k, v in kinds.items()} == {str(i): ("e4srec" if i % 2 else "sasrec") for i in range(1, 9)}

    # a run trained on another item map: the gate cannot score the champion and holds; promote refuses, --force records
    other = write_slice(DATA / "Beauty.txt", tmp_path / "beauty_300.txt", 300)
    prepare_data.run(prepare_data.PrepareDataConfig(), other, tmp_path / "d300")
    pretrain_sasrec.run(pretrain_sasrec.PretrainSasrecConfig(epochs=1, device="cpu"), tmp_path / "d300",
                        tmp_path / "s300", progress=False)
    stage.run(stage.TrainE4SRecConfig(device="cpu", max_examples=64, eval_users=50), tmp_path / "d300",
              tmp_path / "s300", "tiny", tmp_path / "m300", progress=False)
    held = cli("deploy", "--model", tmp_path / "m300", "--sasrec", tmp_path / "s300", "--data", tmp_path / "d300",
               "--output", tmp_path / "dep300", "--registered-model", NAME, "--device", "cpu", "--metric", METRIC)
    assert held.returncode == 0 and "hold: " in held.stdout and f"champion version {was} has another item map" in held.stdout
    refused = cli("promote", NAME, "--version", "9")
    assert refused.returncode == 1 and "another item map" in refused.stderr and "--force" in refused.stderr
    forced = cli("promote", NAME, "--version", "9", "--force")
    assert forced.returncode == 0 and champion() == "9" and "forced: manual promotion" in forced.stdout
    assert registry.alias_history(NAME, "champion")[-1]["forced"] is True
    missing = cli("promote", "no-such-model")
    assert missing.returncode == 1 and "no-such-model: no registered model of that name" in missing.stderr


def config(**kw: object) -> deploy.DeployConfig:
    return deploy.DeployConfig(metric="test/full/HR@10", **kw)


@pytest.mark.parametrize(("scores", "champion_", "kw", "expected"), [
    ({"e4srec": 0.2, "sasrec": 0.1}, None, {}, ("e4srec", True)),
    ({"e4srec": 0.1, "sasrec": 0.1}, None, {}, ("sasrec", True)),  # a tie goes to the cheaper model
    ({"e4srec": 0.1, "sasrec": 0.2}, None, {"when_no_champion": "hold"}, ("sasrec", False)),
    ({"e4srec": 0.3, "sasrec": 0.1}, {"version": "4", "kind": "e4srec", "value": 0.3}, {}, ("e4srec", False)),
    ({"e4srec": 0.31, "sasrec": 0.1}, {"version": "4", "kind": "e4srec", "value": 0.3}, {}, ("e4srec", True)),
    ({"e4srec": 0.31, "sasrec": 0.1}, {"version": "4", "kind": "e4srec", "value": 0.3}, {"min_margin": 0.02},
     ("e4srec", False)),
    ({"e4srec": 0.1, "sasrec": 0.4}, {"version": "4", "kind": "e4srec", "value": 0.3}, {}, ("sasrec", True)),
    ({"e4srec": 0.9, "sasrec": 0.1}, {"version": "4", "kind": "sasrec", "value": None}, {}, ("e4srec", False)),
    ({"e4srec": 0.0, "sasrec": 0.4}, {"version": "4", "kind": "sasrec", "value": 0.5}, {"force_promote": True},
     ("e4srec", True)),
])
def test_decide_never_crowns_a_worse_model(scores: dict, champion_: dict | None, kw: dict, expected: tuple) -> None:
    decision = deploy.decide(config(**kw), scores, champion_)
    assert (decision["candidate"], decision["promote"]) == expected, decision
    assert f"E4SRec {scores['e4srec']:.5f}" in decision["reason"] and f"SASRec {scores['sasrec']:.5f}" in decision["reason"]
    if champion_ and champion_["value"] is not None:
        assert f"{champion_['value']:.5f}" in decision["reason"]
    assert decision["forced"] == bool(kw.get("force_promote"))


def test_a_gate_metric_that_does_not_exist_is_refused_before_any_work() -> None:
    with pytest.raises(E4SRecError, match="metric.*protocol in full/sampled"):
        deploy.DeployConfig(metric="test/full/NDCG@11")


@pytest.fixture(scope="module")
def e4srec_dir(prepared: Path, sasrec_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "model"
    stage.run(stage.TrainE4SRecConfig(device="cpu", max_examples=64, eval_users=50), prepared, sasrec_dir, "tiny",
              out, progress=False)
    return out


@pytest.mark.parametrize("fail_at", ["second registration", "champion move"])
def test_a_failure_after_registration_leaves_the_registry_as_it_was(
        fail_at: str, e4srec_dir: Path, sasrec_dir: Path, prepared: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    settings = deploy.DeployConfig(device="cpu", eval_users=50, registered_model="all-or-nothing", force_promote=True)
    deploy.run_tracked(settings, e4srec_dir, sasrec_dir, prepared, tmp_path / "first")  # versions 1, 2; champion 1
    before = {a: str(registry.version_for("all-or-nothing", a).version) for a in ("champion", "challenger")}
    history = registry.alias_history("all-or-nothing")

    real_register, real_move = registry.log_and_register, registry.move_alias
    calls = []

    def register(*args: object, **kw: object) -> str:
        calls.append(args)
        if fail_at == "second registration" and len(calls) == 2:
            raise RuntimeError("the artifact store went away")
        return real_register(*args, **kw)

    def move(name: str, alias: str, *args: object, **kw: object) -> dict:
        if fail_at == "champion move" and alias == "champion":
            raise RuntimeError("the registry went away")
        return real_move(name, alias, *args, **kw)

    monkeypatch.setattr(registry, "log_and_register", register)
    monkeypatch.setattr(registry, "move_alias", move)
    with pytest.raises(RuntimeError, match="went away"):
        deploy.run_tracked(settings, e4srec_dir, sasrec_dir, prepared, tmp_path / "second")
    versions = sorted(int(v.version) for v in registry.client().search_model_versions("name = 'all-or-nothing'"))
    assert versions == [1, 2]
    assert {a: str(registry.version_for("all-or-nothing", a).version) for a in before} == before
    assert registry.alias_history("all-or-nothing") == history
    assert not (tmp_path / "second").exists() and not list(tmp_path.glob(".second*"))


def test_first_registration_failing_leaves_no_registered_model(e4srec_dir: Path, sasrec_dir: Path, prepared: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    real = registry.log_and_register
    calls = []

    def register(*args: object, **kw: object) -> str:
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("the artifact store went away")
        return real(*args, **kw)

    monkeypatch.setattr(registry, "log_and_register", register)
    with pytest.raises(RuntimeError):
        deploy.run_tracked(deploy.DeployConfig(device="cpu", eval_users=50, registered_model="fresh"), e4srec_dir,
                           sasrec_dir, prepared, tmp_path / "out")
    assert registry.client().search_registered_models("name = 'fresh'") == []
