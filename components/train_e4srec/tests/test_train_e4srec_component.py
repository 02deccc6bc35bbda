"""train-e4srec: the stage function alone, and the component in a one-stage kfp.local pipeline.

The inputs come from earlier outputs through `dsl.importer`, the way one stage is rerun alone.
"""

# No `from __future__ import annotations`: KFP reads the pipeline's real annotations.
from pathlib import Path

from e4srec import contracts as c
from e4srec import e4srec as e4srec_model
from e4srec.stages import train_e4srec as stage
from e4srec_components.train_e4srec import component
from kfp import dsl, local


def test_run_writes_a_reloadable_model(prepared: Path, sasrec_dir: Path, tmp_path: Path) -> None:
    config = stage.TrainE4SRecConfig(device="cpu", max_examples=64, eval_users=50, batch_size=16)
    metrics = stage.run(config, prepared, sasrec_dir, "tiny", tmp_path / "m", progress=False)
    assert metrics == c.read_json(tmp_path / "m" / c.METRICS) and metrics["eval/users"] == 50
    model = e4srec_model.load_model(tmp_path / "m")
    assert model.config.n_items == c.load_sequence_data(prepared).n_items


def test_component_runs_in_a_one_stage_kfp_local_pipeline(prepared: Path, sasrec_dir: Path, tmp_path: Path) -> None:
    from e4srec.stages import instruction_tune

    train = component.build()
    backbone = tmp_path / "backbone"  # what instruction-tune --skip hands on: the descriptor alone
    instruction_tune.run(instruction_tune.InstructionTuneConfig(backbone="tiny", skip=True), None, backbone)

    @dsl.pipeline(name="rerun-train-e4srec")
    def rerun() -> dsl.Model:
        data = dsl.importer(artifact_uri=str(prepared), artifact_class=dsl.Dataset)
        sasrec = dsl.importer(artifact_uri=str(sasrec_dir), artifact_class=dsl.Model)
        tuned = dsl.importer(artifact_uri=str(backbone), artifact_class=dsl.Model)
        return train(data=data.output, sasrec=sasrec.output, backbone=tuned.output, max_examples=32, eval_users=20,
                     device="cpu", tracking=False).outputs["model"]

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    model = rerun().output
    assert model.metadata["backbone"] == "tiny" and model.metadata["kind"] == "e4srec"
    assert (Path(model.path) / "adapter" / "adapter_config.json").is_file()
