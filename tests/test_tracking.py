"""Where MLflow tracking puts a stage's artifacts when the store is a SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest
from e4srec import tracking


def test_artifacts_go_beside_the_sqlite_database_not_the_working_folder(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (tmp_path / "db").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}")
    note = tmp_path / "note.txt"
    note.write_text("hello\n")
    with tracking.stage_run("prepare-data", experiment="team/beauty") as tracker:
        tracker.log_artifact(note)
    logged = list((tmp_path / "db" / "mlruns" / "team%2Fbeauty").glob("*/artifacts/note.txt"))
    assert [p.read_text() for p in logged] == ["hello\n"]
    assert not (elsewhere / "mlruns").exists()


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "postgresql://u@h/db", "sqlite:///:memory:", "sqlite://"])
def test_other_stores_choose_their_own_artifact_root(uri: str) -> None:
    assert tracking._beside_database(uri, "e4srec") is None
