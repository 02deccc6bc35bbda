"""promote: the champion alias walks back along its recorded history; an ungated version needs --force."""

from __future__ import annotations

from pathlib import Path

import pytest
from e4srec import registry
from e4srec.errors import E4SRecError

NAME = "e4srec-promote-test"


@pytest.fixture()
def versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Versions 1-3 chosen by the gate (tag gate=candidate), 4 registered by hand (no gate tag)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mc = registry.client()
    mc.create_registered_model(NAME)
    for v in range(1, 5):
        version = mc.create_model_version(NAME, source=str(tmp_path / f"model{v}"))
        mc.set_model_version_tag(NAME, version.version, "item_map_sha256", "same")
        if v < 4:
            mc.set_model_version_tag(NAME, version.version, "gate", "candidate")


def champion() -> str:
    return str(registry.version_for(NAME, registry.CHAMPION).version)


def test_rollback_walks_back_the_history_instead_of_toggling(versions: None) -> None:
    for v in ("1", "3", "2"):
        registry.promote(NAME, to_version=v)
    assert registry.champions(NAME) == ["1", "3", "2"]
    assert registry.promote(NAME, rollback=True)["to"] == "3"
    assert registry.promote(NAME, rollback=True)["to"] == "1"  # toggling would give 2 again
    with pytest.raises(E4SRecError, match="only champion there has been"):
        registry.promote(NAME, rollback=True)
    moves = registry.alias_history(NAME, registry.CHAMPION)
    assert [(m["from"], m["to"], m["rollback"]) for m in moves] == [
        (None, "1", False), ("1", "3", False), ("3", "2", False), ("2", "3", True), ("3", "1", True)]
    registry.promote(NAME, to_version="2")  # a new promotion after rollbacks: rollback goes back to 1
    assert registry.champions(NAME) == ["1", "2"] and registry.promote(NAME, rollback=True)["to"] == "1"


def test_promoting_a_version_the_gate_never_chose_needs_force(versions: None) -> None:
    registry.promote(NAME, to_version="1")
    with pytest.raises(E4SRecError, match="version 4 was never chosen by the gate.*--force"):
        registry.promote(NAME, to_version="4")
    assert champion() == "1"
    move = registry.promote(NAME, to_version="4", force=True)
    assert champion() == "4" and move["forced"] is True
    registry.promote(NAME, to_version="2")
    assert registry.promote(NAME, rollback=True)["to"] == "4"  # once champion, it is part of the history


def test_each_move_is_a_readable_tag_in_the_ui_beside_its_record(versions: None) -> None:
    import json

    registry.promote(NAME, to_version="1")
    registry.promote(NAME, to_version="3")
    tags = registry.client().get_model_version(NAME, "3").tags
    readable = [v for k, v in tags.items() if k.startswith(registry.MOVE_TAG)]
    records = [json.loads(v) for k, v in tags.items() if k.startswith(registry.MOVE_RECORD_TAG)]
    assert len(readable) == 1 and len(records) == 1
    assert readable[0].startswith("champion: version 1 -> 3  (") and readable[0].endswith(" UTC)"), readable[0]
    assert not readable[0].startswith("{") and records[0]["from"] == "1"
    # a move an earlier build recorded (the JSON under MOVE_TAG) is still history
    old = {**records[0], "from": "3", "to": "2", "when": records[0]["when"] + 1}
    registry.client().set_model_version_tag(NAME, "2", f"{registry.MOVE_TAG}{int(old['when'] * 1000)}", json.dumps(old))
    assert registry.champions(NAME) == ["1", "3", "2"]


def test_the_serve_command_carries_the_tracking_uri_it_needs(versions: None, monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    line = registry.serve_command(NAME)
    assert f"MLFLOW_TRACKING_URI=sqlite:///{tmp_path / 'mlflow.db'} mlflow models serve -m models:/{NAME}@champion" \
        in line, line
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")  # relative: made absolute for any folder
    assert f"MLFLOW_TRACKING_URI=sqlite:///{tmp_path / 'mlflow.db'} " in registry.serve_command(NAME)
