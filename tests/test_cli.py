"""The CLI as documented: every subcommand's --help, and the stage commands as the README writes them."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from e4srec import contracts as c
from helpers import e4srec


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("prepare-data", ["--input", "--output", "--k-core", "--max-len", "--n-negatives", "--seed", "--no-tracking"]),
        ("pretrain-sasrec", ["--data", "--output", "--loss", "--epochs", "--patience", "--device"]),
        ("evaluate", ["--model", "--data", "--output"]),
        ("run", ["--input", "--pipeline-root", "--sasrec-loss", "--sasrec-epochs", "--experiment"]),
        ("compile", ["--output", "--profile"]),
        ("submit", ["--host", "--namespace", "--kfp-experiment", "--experiment", "--token", "--cookie", "--profile", "--input",
                    "--force-promote", "--no-force-promote", "--instruction-tune-backbone"]),
        ("rerun", ["--from", "--set", "--input-override", "--profile", "--host"]),
        ("deploy", ["--model", "--sasrec", "--data", "--metric", "--min-margin", "--when-no-champion", "--force-promote"]),
        ("promote", ["--version", "--rollback", "--history", "--force"]),
        ("recommend", ["--model", "--history", "--k"]),
        ("batch-recommend", ["--model", "--data", "--k"]),
        ("extend-items", ["--model", "--new-items"]),
        ("instruction-tune", ["--instructions", "--backbone", "--quantization", "--skip", "--merge"]),
        ("train-e4srec", ["--data", "--sasrec", "--backbone", "--checkpoint-every", "--resume", "--prefix-cache"]),
    ],
)
def test_help(command: str, flags: list[str]) -> None:
    result = e4srec(command, "--help")
    assert result.returncode == 0, result.stderr
    for flag in flags:
        assert flag in result.stdout
    assert "--no-no-" not in result.stdout


def test_train_e4srec_still_takes_the_llm_flag() -> None:
    """--llm, the flag's name in the previous release, reaches the same setting as --backbone."""
    from e4srec.cli import build_parser

    argv = ["train-e4srec", "--data", "d", "--sasrec", "s", "--output", "o"]
    assert build_parser().parse_args(argv + ["--llm", "tiny"]).backbone == "tiny"
    assert build_parser().parse_args(argv + ["--backbone", "tiny"]).backbone == "tiny"


def test_help_imports_neither_torch_nor_kfp() -> None:
    """Every command's --help is built from e4srec.settings and the command tables, so it answers at once."""
    import subprocess
    import sys

    code = ("import contextlib, io, sys\n"
            "from e4srec.cli import build_parser\n"
            "from e4srec.commands import operations, pipeline, stages\n"
            "parser = build_parser()\n"
            "names = [c.name for c in stages.COMMANDS + operations.COMMANDS + pipeline.COMMANDS]\n"
            "for name in names:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        parser.parse_args([name, '--help'])\n"
            "print(len(names), sorted(m for m in ('torch', 'kfp', 'mlflow') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["17", "[]"], result.stdout


def test_stage_commands_as_documented(tmp_path: Path, beauty_slice: Path) -> None:
    data, model = tmp_path / "OUT", tmp_path / "OUT2"
    result = e4srec("prepare-data", "--input", beauty_slice, "--output", data)
    assert result.returncode == 0, result.stderr
    assert {f.name for f in data.iterdir()} >= {c.SEQUENCES, c.ITEM_MAP, c.NEGATIVES, c.MANIFEST, c.METRICS}
    result = e4srec("pretrain-sasrec", "--data", data, "--output", model, "--loss", "ce", "--epochs", "2")
    assert result.returncode == 0, result.stderr
    assert "test   full" in result.stdout  # the metrics table
    metrics = c.read_json(model / c.METRICS)
    assert metrics["train/epochs"] == 2
    # tracked: the conftest points MLFLOW_TRACKING_URI at a throwaway SQLite file
    runs = mlflow.search_runs(experiment_names=["e4srec"], filter_string="tags.`e4srec.stage` = 'pretrain-sasrec'")
    run = runs.sort_values("start_time").iloc[-1]
    assert run["params.loss"] == "ce" and run["status"] == "FINISHED"
    assert run["metrics.test/full/HR_at_10"] == pytest.approx(metrics["test/full/HR@10"])
    history = mlflow.MlflowClient().get_metric_history(run["run_id"], "train/loss")
    assert [m.step for m in history] == [1, 2]

    result = e4srec("evaluate", "--model", model, "--data", data, "--output", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    again = c.read_json(tmp_path / "eval" / c.METRICS)
    assert again["test/full/NDCG@10"] == pytest.approx(metrics["test/full/NDCG@10"])
