"""prepare-data: the stage function alone, and the component through kfp.local."""

from __future__ import annotations

from pathlib import Path

from e4srec import contracts as c
from e4srec.stages import prepare_data as stage
from e4srec_components.prepare_data import component
from kfp import local


def test_run_writes_the_contract(beauty_slice: Path, tmp_path: Path) -> None:
    metrics = stage.run(stage.PrepareDataConfig(max_len=20, n_negatives=50), beauty_slice, tmp_path / "out")
    data = c.load_sequence_data(tmp_path / "out")
    assert data.max_len == 20 and data.negatives.shape == (data.n_users, 50)
    assert metrics["data/users"] == data.n_users == 800
    assert c.read_json(tmp_path / "out" / c.METRICS) == metrics


def test_component_runs_in_kfp_local(beauty_slice: Path, tmp_path: Path) -> None:
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    task = component.build()(input_uri=str(beauty_slice), tracking=False)
    data = task.outputs["data"]
    assert c.load_sequence_data(data.path).n_users == 800
    assert data.metadata["item_map_sha256"] == c.read_json(Path(data.path) / c.MANIFEST)["item_map_sha256"]
    assert task.outputs["metrics"].metadata["data/users"] == 800
    assert Path(task.outputs["metrics"].path).is_file()  # a file, so KFP's cache can hit
