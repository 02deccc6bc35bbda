"""train-e4srec survives a kill (resume gives the unbroken run's result) and trains data-parallel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e4srec import contracts as c
from helpers import e4srec, free_port


def common(prepared: Path, sasrec_dir: Path, *extra: str) -> list[str]:
    return ["train-e4srec", "--data", str(prepared), "--sasrec", str(sasrec_dir), "--backbone", "tiny",
            "--device", "cpu", "--threads", "1", "--no-tracking", *extra]


def test_a_killed_run_resumes_to_the_unbroken_result(prepared: Path, sasrec_dir: Path, tmp_path: Path) -> None:
    args = common(prepared, sasrec_dir, "--batch-size", "8", "--max-examples", "800", "--epochs", "2",
                  "--eval-users", "200")
    unbroken = e4srec(*args, "--output", tmp_path / "a")
    assert unbroken.returncode == 0, unbroken.stderr

    out, ckpt = tmp_path / "b", tmp_path / "b.checkpoints"
    cmd = [sys.executable, "-m", "e4srec.cli", *args, "--output", str(out), "--checkpoint-every", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        progress = ckpt / "progress.json"
        try:
            state = json.loads(progress.read_text())
        except (OSError, ValueError):
            state = None
        if state and state["step"] >= 20 and state["batch"] > 0:  # mid-epoch
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists()  # nothing published by the killed run

    resumed = e4srec(*args, "--output", out, "--checkpoint-every", "5", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = c.read_json(tmp_path / "a" / c.METRICS), c.read_json(out / c.METRICS)
    for key in [k for k in a if k.startswith(("valid/", "test/"))] + ["train/loss_last", "train/steps"]:
        assert a[key] == b[key], key
    log_a = json.loads((tmp_path / "a" / "training_log.json").read_text())
    log_b = json.loads((out / "training_log.json").read_text())
    assert [r["train/loss"] for r in log_a] == [r["train/loss"] for r in log_b]
    assert not ckpt.exists()  # cleaned up after success


@pytest.mark.timeout(600)
def test_two_gloo_processes_match_one_at_the_same_global_batch(prepared: Path, sasrec_dir: Path,
                                                                 tmp_path: Path) -> None:
    args = common(prepared, sasrec_dir, "--batch-size", "12", "--max-examples", "240", "--eval-users", "50",
                  "--lora-dropout", "0",  # dropout draws differ per process; without it the math is equal
                  "--dtype", "fp32")  # ... to fp32 rounding: bf16 sums of two halves differ by more
    one = e4srec(*args, "--output", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "e4srec.cli", *args, "--output", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    log_one = json.loads((tmp_path / "one" / "training_log.json").read_text())
    log_two = json.loads((tmp_path / "two" / "training_log.json").read_text())
    assert len(log_one) == len(log_two) == 20
    for r1, r2 in zip(log_one, log_two):
        assert r2["train/loss"] == pytest.approx(r1["train/loss"], rel=1e-4, abs=1e-5), r1["step"]
    assert c.read_json(tmp_path / "two" / c.METRICS)["train/world_size"] == 2
    assert c.read_json(tmp_path / "one" / c.METRICS)["train/world_size"] == 1


@pytest.mark.timeout(600)
def test_run_distributed_launches_torchrun_like_a_pod_would(prepared: Path, sasrec_dir: Path, tmp_path: Path) -> None:
    from e4srec.stages import train_e4srec as stage

    config = stage.TrainE4SRecConfig(batch_size=12, max_examples=96, eval_users=20, lora_dropout=0.0, device="cpu",
                                     threads=1)
    metrics = stage.run_distributed(config, prepared, sasrec_dir, "tiny", tmp_path / "m", 2, tracking=False)
    assert metrics["train/world_size"] == 2 and metrics["train/steps"] == 8
