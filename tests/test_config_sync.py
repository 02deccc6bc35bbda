"""One config per stage (e4srec.settings): the KFP components take its fields, and the pipeline's parameters,
types, defaults and docs are the ones e4srec.settings.PIPELINE derives from it."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from e4srec import settings
from e4srec_components.batch_recommend.component import batch_recommend
from e4srec_components.deploy.component import deploy
from e4srec_components.instruction_tune.component import instruction_tune
from e4srec_components.prepare_data.component import prepare_data
from e4srec_components.pretrain_sasrec.component import pretrain_sasrec
from e4srec_components.train_e4srec.component import train_e4srec
from e4srec_pipelines import create_pipeline

TRACKING = {"tracking", "experiment", "pipeline_run_name"}
LAUNCH = {"nproc_per_node", "tune"}  # how the component runs the stage (tune: `not skip`), not a stage setting
COMPONENTS = {
    "prepare-data": (prepare_data, {"input_uri", "data", "metrics"}),
    "pretrain-sasrec": (pretrain_sasrec, {"data", "model", "metrics"}),
    "instruction-tune": (instruction_tune, {"instructions_uri", "backbone", "metrics"}),
    "train-e4srec": (train_e4srec, {"data", "sasrec", "backbone", "model", "metrics"}),
    "deploy": (deploy, {"model", "sasrec", "data", "verdict", "metrics"}),
    "batch-recommend": (batch_recommend, {"model", "data", "recommendations", "metrics"}),
}


@pytest.mark.parametrize("stage", list(settings.STAGES))
def test_component_parameters_are_the_config_fields(stage: str) -> None:
    func, artifacts = COMPONENTS[stage]
    renamed = {v: field for (s, field), v in settings.COMPONENT_NAMES.items() if s == stage}
    params = {renamed.get(n, n): p.default for n, p in inspect.signature(func).parameters.items()
              if n not in artifacts | TRACKING | LAUNCH}
    fields = {f.name: f.default for f in dataclasses.fields(settings.STAGES[stage])}
    assert params == fields


def test_the_compiled_pipeline_takes_the_settings_parameters() -> None:
    """What KFP reads off the generated signature and docstring: every parameter, its type, default and help."""
    spec = create_pipeline("local").component_spec
    inputs = spec.inputs
    assert list(inputs) == [q.name for q in settings.PIPELINE]
    kinds = {str: "String", int: "Integer", float: "Float", bool: "Boolean"}
    for q in settings.PIPELINE:
        given = inputs[q.name]
        assert given.type == kinds[q.annotation], q.name
        if q.default is settings.REQUIRED:
            assert given.default is None and not given.optional, q.name
        else:
            assert given.default == q.default, q.name
        assert given.description and " ".join(given.description.split()) == " ".join(q.help_text.split()), q.name


def test_every_pipeline_parameter_that_sets_a_stage_field_has_its_type_and_default() -> None:
    for q in settings.PIPELINE:
        for stage, name in q.sets:
            field = {f.name: f for f in dataclasses.fields(settings.STAGES[stage])}[name]
            assert q.default == field.default, (q.name, stage)
            assert q.annotation is settings.cfg.field_type(settings.STAGES[stage], field), (q.name, stage)


def test_a_bad_pipeline_argument_names_the_stage_field() -> None:
    from e4srec.errors import E4SRecError

    with pytest.raises(E4SRecError, match="PretrainSasrecConfig.dropout=1.5"):
        settings.check_pipeline_arguments({"input_uri": "x", "sasrec_dropout": 1.5})
    with pytest.raises(E4SRecError, match="TrainE4SRecConfig.eval_users=-1"):  # it sets deploy's too
        settings.check_pipeline_arguments({"input_uri": "x", "e4srec_eval_users": -1})
