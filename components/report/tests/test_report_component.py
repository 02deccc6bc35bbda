"""report: one self-contained HTML page with the metrics, curves, groups and published numbers."""

from __future__ import annotations

from pathlib import Path

from e4srec.stages import report as stage
from e4srec.stages import train_e4srec


def test_report_page(prepared: Path, sasrec_dir: Path, tmp_path: Path) -> None:
    train_e4srec.run(train_e4srec.TrainE4SRecConfig(device="cpu", max_examples=64, eval_users=30), prepared,
                     sasrec_dir, "tiny", tmp_path / "model", progress=False)
    stage.run(prepared, sasrec_dir, tmp_path / "model", tmp_path / "report")
    page = (tmp_path / "report" / stage.PAGE).read_text()
    for needle in ("<h2>Metrics</h2>", "<h2>Training</h2>", "<h2>By history length</h2>", "SASRec", "E4SRec",
                   "evaluated on 30 of 800 users", "data:image/png;base64,"):
        assert needle in page, needle
    # the slice is named beauty_800.txt, not Beauty.txt: no published numbers are claimed for it
    assert "No published numbers recorded" in page
    for png in ("metrics_comparison.png", "sasrec_training.png", "e4srec_training.png", "metrics_by_length.png"):
        assert (tmp_path / "report" / png).stat().st_size > 5000, png
