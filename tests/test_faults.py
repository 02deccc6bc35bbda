"""Faults a stage must survive, with real processes and servers: SIGTERM and SIGKILL mid-stage, the
MLflow server going away mid-stage, two promotions at once. (SeaweedFS stopped mid-upload:
tests/test_storage.py; a killed train-e4srec resuming to the unbroken result: tests/test_e4srec_resilience.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e4srec import contracts as c
from e4srec import registry
from helpers import digest, mlflow_server


def sasrec_command(data: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "e4srec.cli", "pretrain-sasrec", "--data", str(data), "--output", str(out),
            "--epochs", str(epochs), "--patience", str(epochs), "--device", "cpu", "--threads", "1", *extra]


def wait_for_partial(out: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    """The stage's staged output folder, once it exists (the stage is then mid-work)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(out.parent.glob(f".{out.name}.partial-*"))
        if found:
            return found[0]
        assert proc.poll() is None, "the stage ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("no staged output appeared")


def test_sigterm_mid_stage_leaves_nothing_behind(prepared: Path, tmp_path: Path) -> None:
    before = digest([prepared])
    out = tmp_path / "sasrec"
    proc = subprocess.Popen(sasrec_command(prepared, out, 1000, "--no-tracking"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_partial(out, proc)
    time.sleep(1.0)  # training
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "e4srec pretrain-sasrec: stopped by SIGTERM; unfinished output removed"
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".sasrec.*")), list(tmp_path.iterdir())
    assert digest([prepared]) == before


def test_sigkill_mid_stage_then_the_same_command_succeeds_and_sweeps_the_dead_partial(prepared: Path,
                                                                                       tmp_path: Path) -> None:
    out = tmp_path / "sasrec"
    command = sasrec_command(prepared, out, 25, "--no-tracking")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dead = wait_for_partial(out, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert dead.is_dir() and not out.exists()  # SIGKILL cannot be cleaned up after: the half folder stays hidden
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / c.METRICS).is_file() and not dead.exists()  # the dead run's folder was swept
    assert not list(tmp_path.glob(".sasrec.*"))


def test_mlflow_server_stopped_mid_stage_costs_the_tracking_not_the_work(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "sasrec"
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"), {}, tmp_path) as url:
        env["MLFLOW_TRACKING_URI"] = url
        proc = subprocess.Popen(sasrec_command(prepared, out, 30, "--tracking"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        try:
            wait_for_partial(out, proc)
        except AssertionError:
            raise AssertionError(proc.communicate()[1][-3000:]) from None
        time.sleep(3)  # a few epochs logged
    # the server is gone; the stage trains on
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning: MLflow tracking stopped")]
    assert len(warnings) == 1, err[-3000:]
    metrics = c.read_json(out / c.METRICS)
    assert metrics["train/epochs"] == 30 and 0 < metrics["test/full/NDCG@10"] < 1


NAME = "e4srec-concurrent-promote"


def test_two_promotions_at_once_leave_alias_and_history_agreeing(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mc = registry.client()
    mc.create_registered_model(NAME)
    for _ in range(3):
        version = mc.create_model_version(NAME, source=str(tmp_path / "model"))
        mc.set_model_version_tag(NAME, version.version, "item_map_sha256", "same")
        mc.set_model_version_tag(NAME, version.version, "gate", "candidate")
    registry.promote(NAME, to_version="1")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    procs = [subprocess.Popen([sys.executable, "-m", "e4srec.cli", "promote", NAME, "--version", v], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in ("2", "3")]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    moves = registry.alias_history(NAME, registry.CHAMPION)
    assert len(moves) == 3
    for earlier, later in zip(moves, moves[1:]):  # an unbroken chain: each move starts where the last ended
        assert later["from"] == earlier["to"], moves
    assert str(registry.version_for(NAME, registry.CHAMPION).version) == moves[-1]["to"]

    # Two processes at once rarely overlap by chance; the lock itself: a promotion waits while another holds it.
    with registry.alias_lock(NAME):
        waiting = subprocess.Popen([sys.executable, "-m", "e4srec.cli", "promote", NAME, "--version", "1"], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(10)  # time enough to start, import and reach the lock
        assert waiting.poll() is None, waiting.communicate()
        released = time.time()
    assert waiting.wait(timeout=120) == 0, waiting.stderr.read()
    last = registry.alias_history(NAME, registry.CHAMPION)[-1]
    assert last["to"] == "1" and last["when"] >= released
