"""One config per stage: the KFP component parameters and the pipeline defaults must match it."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from e4srec.stages.batch_recommend import BatchRecommendConfig
from e4srec.stages.deploy import DeployConfig
from e4srec.stages.instruction_tune import InstructionTuneConfig
from e4srec.stages.prepare_data import PrepareDataConfig
from e4srec.stages.pretrain_sasrec import PretrainSasrecConfig
from e4srec.stages.train_e4srec import TrainE4SRecConfig
from e4srec_components.batch_recommend.component import batch_recommend
from e4srec_components.deploy.component import deploy
from e4srec_components.instruction_tune.component import instruction_tune
from e4srec_components.prepare_data.component import prepare_data
from e4srec_components.pretrain_sasrec.component import pretrain_sasrec
from e4srec_components.train_e4srec.component import train_e4srec
from e4srec_pipelines import pipeline_parameters

TRACKING = {"tracking", "experiment", "pipeline_run_id", "pipeline_run_name"}
LAUNCH = {"nproc_per_node", "tune"}  # how the component runs the stage (tune: `not skip`), not a stage setting


@pytest.mark.parametrize(("func", "config", "artifacts"), [
    (prepare_data, PrepareDataConfig, {"input_uri", "data", "metrics"}),
    (pretrain_sasrec, PretrainSasrecConfig, {"data", "model", "metrics"}),
    (instruction_tune, InstructionTuneConfig, {"instructions_uri", "backbone", "metrics"}),
    (train_e4srec, TrainE4SRecConfig, {"data", "sasrec", "llm", "model", "metrics"}),
    (deploy, DeployConfig, {"model", "sasrec", "data", "verdict", "metrics"}),
    (batch_recommend, BatchRecommendConfig, {"model", "data", "recommendations", "metrics"}),
])
def test_component_parameters_are_the_config_fields(func, config, artifacts) -> None:  # noqa: ANN001
    renamed = {"backbone_spec": "backbone"}  # `backbone` is the component's output artifact
    params = {renamed.get(n, n): p.default for n, p in inspect.signature(func).parameters.items()
              if n not in artifacts | TRACKING | LAUNCH}
    fields = {f.name: f.default for f in dataclasses.fields(config)}
    assert params == fields


def test_pipeline_defaults_match_the_stage_configs() -> None:
    params = pipeline_parameters()
    data, sasrec = PrepareDataConfig(), PretrainSasrecConfig()
    assert params["input_format"][1] == data.format
    for name in ("k_core", "max_len", "n_negatives", "seed"):
        assert params[name][1] == getattr(data, name), name
    assert params["seed"][1] == sasrec.seed
    for name in ("loss", "epochs", "batch_size", "lr", "dropout", "patience"):
        assert params[f"sasrec_{name}"][1] == getattr(sasrec, name), name
    assert params["device"][1] == sasrec.device
    tune = InstructionTuneConfig()
    assert (params["backbone"][1], params["backbone_dtype"][1], params["quantization"][1]) == (
        tune.backbone, tune.dtype, tune.quantization)
    for name in ("max_examples", "epochs", "batch_size", "lr"):
        assert params[f"instruct_{name}"][1] == getattr(tune, name), name
    gate = DeployConfig()
    assert (params["gate_metric"][1], params["gate_min_margin"][1], params["when_no_champion"][1],
            params["force_promote"][1], params["registered_model"][1]) == (
        gate.metric, gate.min_margin, gate.when_no_champion, gate.force_promote, gate.registered_model)
    e4srec = TrainE4SRecConfig()
    for name in ("epochs", "batch_size", "lr", "max_examples", "eval_users"):
        assert params[f"e4srec_{name}"][1] == getattr(e4srec, name), name
    assert all(help_text for _, _, help_text in params.values())  # every parameter is documented
