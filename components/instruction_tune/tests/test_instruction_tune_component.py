"""instruction-tune: the stage function alone, and the component through kfp.local."""

from __future__ import annotations

from pathlib import Path

from e4srec import contracts as c
from e4srec import llm
from e4srec.stages import instruction_tune as stage
from e4srec_components.instruction_tune import component
from helpers import DATA
from kfp import local


def test_run_skip_writes_only_the_descriptor(tmp_path: Path) -> None:
    stage.run(stage.InstructionTuneConfig(backbone="tiny", skip=True), None, tmp_path / "out")
    assert c.read_json(tmp_path / "out" / llm.DESCRIPTOR)["adapter"] is None


def test_component_runs_in_kfp_local(tmp_path: Path) -> None:
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    task = component.build()(instructions_uri=str(DATA / "instructions.json"), backbone_spec="tiny",
                             max_examples=8, holdout=4, generations=1, max_new_tokens=4, device="cpu",
                             tracking=False)
    out = Path(task.outputs["backbone"].path)
    assert "Output" not in task.outputs  # the backbone travels as the artifact, not as a URI string
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert task.outputs["metrics"].metadata["instruct/train_examples"] == 8
