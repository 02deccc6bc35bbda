"""pretrain-sasrec: the stage function alone, and the component in a one-stage kfp.local pipeline.

A lone kfp.local component cannot take an input artifact, so the test feeds it through
`dsl.importer`, which is also how a single stage is rerun on an earlier run's output.
"""

# No `from __future__ import annotations`: KFP reads the pipeline's real annotations.

from pathlib import Path

from e4srec import contracts as c
from e4srec import sasrec as sasrec_model
from e4srec.stages import pretrain_sasrec as stage
from e4srec_components.pretrain_sasrec import component
from kfp import dsl, local


def test_run_writes_weights_embeddings_and_metrics(prepared: Path, tmp_path: Path) -> None:
    config = stage.PretrainSasrecConfig(epochs=1, dim=32, device="cpu")
    metrics = stage.run(config, prepared, tmp_path / "m", progress=False)
    emb = sasrec_model.load_item_embeddings(tmp_path / "m", c.load_sequence_data(prepared).item_map_sha256)
    assert emb.shape[1] == 32
    assert metrics == c.read_json(tmp_path / "m" / c.METRICS)


def test_component_runs_in_a_one_stage_kfp_local_pipeline(prepared: Path, tmp_path: Path) -> None:
    sasrec = component.build()
    manifest = c.read_json(prepared / c.MANIFEST)

    @dsl.pipeline(name="rerun-pretrain-sasrec")
    def rerun() -> dsl.Model:
        data = dsl.importer(artifact_uri=str(prepared), artifact_class=dsl.Dataset, reimport=False,
                            metadata={"item_map_sha256": manifest["item_map_sha256"]})
        return sasrec(data=data.output, epochs=1, loss="ce", device="cpu", tracking=False).outputs["model"]

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    model = rerun().output
    assert model.metadata["item_map_sha256"] == manifest["item_map_sha256"]
    assert c.read_json(Path(model.path) / "config.json")["train"]["loss"] == "ce"
    assert (Path(model.path) / sasrec_model.EMBEDDINGS).is_file()
