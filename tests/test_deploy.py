"""The promotion gate through whole pipeline runs, manual promotion, rollback and the alias history."""

from __future__ import annotations

from pathlib import Path

import pytest
from e4srec import contracts as c
from e4srec import registry
from e4srec.stages import prepare_data, pretrain_sasrec
from e4srec.stages import train_e4srec as stage
from helpers import DATA, e4srec, write_slice

NAME = "e4srec-beauty_800"
# Full-ranking NDCG of a tiny random backbone over 800 users is too noisy to order models reliably;
# the sampled protocol separates these three (0.0475 < 0.061 < 0.118 when calibrated).
GATE = ("--gate-metric", "test/sampled/NDCG@10")


def pipeline_run(tmp_path: Path, raw: Path, *args: str) -> dict:
    """One `e4srec run` on the tiny backbone; returns the deploy verdict."""
    result = e4srec("run", "--input", raw, "--pipeline-root", tmp_path / "runs", "--sasrec-epochs", "2",
                    "--backbone", "tiny", "--e4srec-batch-size", "32", *GATE, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = max((tmp_path / "runs").glob("e4srec-*"))
    return c.read_json(run_dir / "deploy" / "verdict" / "verdict.json")


@pytest.mark.timeout(900)
def test_gate_over_three_runs_then_rollback_and_history(tmp_path: Path, beauty_slice: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # run 1: no champion yet, so the first-run setting (promote) makes v1 champion
    v1 = pipeline_run(tmp_path, beauty_slice, "--e4srec-lr", "3e-3", "--e4srec-max-examples", "1000")
    assert (v1["challenger_version"], v1["promote"], v1["champion_version"]) == ("1", True, None)
    assert str(registry.version_for(NAME, "champion").version) == "1"
    # run 2: a model barely trained (learning rate 1e-7) is worse and must not move the champion
    v2 = pipeline_run(tmp_path, beauty_slice, "--e4srec-lr", "1e-7", "--e4srec-max-examples", "64")
    assert v2["challenger_value"] < v2["champion_value"] == v1["challenger_value"], v2
    assert not v2["promote"] and str(registry.version_for(NAME, "champion").version) == "1"
    assert str(registry.version_for(NAME, "challenger").version) == "2"
    # run 3: trained on every example for 3 epochs, it beats the champion and takes its place
    v3 = pipeline_run(tmp_path, beauty_slice, "--e4srec-lr", "5e-3", "--e4srec-epochs", "3")
    assert v3["challenger_value"] > v3["champion_value"] and v3["promote"], v3
    assert str(registry.version_for(NAME, "champion").version) == "3"

    rolled = e4srec("promote", NAME, "--rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert "champion: version 3 -> 1  (rollback from version 3" in rolled.stdout
    assert str(registry.version_for(NAME, "champion").version) == "1"
    history = registry.alias_history(NAME, "champion")
    assert [(m["from"], m["to"]) for m in history] == [(None, "1"), ("1", "3"), ("3", "1")]
    assert all(m["who"] and m["when"] and m["reason"] for m in history)
    assert history[1]["metrics"]["test/sampled/NDCG@10"] == pytest.approx(v3["challenger_value"])
    listed = e4srec("promote", NAME, "--history")
    assert listed.returncode == 0 and len(listed.stdout.strip().splitlines()) == 6  # 3 challenger + 3 champion

    # a version trained on another item map: the gate holds, and promote refuses it unless forced
    other = write_slice(DATA / "Beauty.txt", tmp_path / "beauty_300.txt", 300)
    prepare_data.run(prepare_data.PrepareDataConfig(), other, tmp_path / "d300")
    pretrain_sasrec.run(pretrain_sasrec.PretrainSasrecConfig(epochs=1, device="cpu"), tmp_path / "d300",
                        tmp_path / "s300", progress=False)
    stage.run(stage.TrainE4SRecConfig(device="cpu", max_examples=64), tmp_path / "d300", tmp_path / "s300", "tiny",
              tmp_path / "m300", progress=False)
    held = e4srec("deploy", "--model", tmp_path / "m300", "--data", tmp_path / "d300", "--output",
                  tmp_path / "dep300", "--registered-model", NAME, "--device", "cpu", "--metric", GATE[1])
    assert held.returncode == 0 and "verdict: hold: champion version 1 has another item map" in held.stdout
    refused = e4srec("promote", NAME, "--version", "4")
    assert refused.returncode == 1 and "another item map" in refused.stderr and "--force" in refused.stderr
    forced = e4srec("promote", NAME, "--version", "4", "--force")
    assert forced.returncode == 0 and str(registry.version_for(NAME, "champion").version) == "4"
    missing = e4srec("promote", "no-such-model")
    assert missing.returncode == 1 and "registered model 'no-such-model' not found" in missing.stderr
