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
