"""KFP components `deploy` (register + verdict) and `promote-champion` (the alias move under dsl.If)."""

# No `from __future__ import annotations`: KFP reads the real annotation objects.
from e4srec.images import CPU_IMAGE
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def deploy(
    model: Input[Model],
    sasrec: Input[Model],
    data: Input[Dataset],
    verdict: Output[Artifact],
    metrics: Output[Metrics],
    registered_model: str = "",
    metric: str = "test/full/NDCG@10",
    min_margin: float = 0.0,
    when_no_champion: str = "promote",
    force_promote: bool = False,
    eval_users: int = 0,
    eval_batch_size: int = 64,
    seed: int = 42,
    device: str = "auto",
    tracking: bool = True,
    experiment: str = "e4srec",
    pipeline_run_name: str = "",
) -> bool:
    """Score the run's E4SRec (`model`) and SASRec against the champion, register both; returns the verdict.

    The alias move is `promote_champion`, which the pipeline runs under dsl.If on this output (one
    unnamed output: kfp.local resolves conditions on `Output` but not on named outputs). With tracking
    off there is no registry: nothing is registered and the verdict is "hold".
    """
    from e4srec.kfp_artifacts import write_metrics
    from e4srec.settings import component_config
    from e4srec.stages import deploy as stage

    config = component_config("deploy", locals())
    values = stage.run_tracked(config, model.path, sasrec.path, data.path, verdict.path, apply=False,
                               tracking=tracking, experiment=experiment, pipeline_run_name=pipeline_run_name)
    result = stage.read_verdict(verdict.path)
    verdict.metadata.update({k: v for k, v in result.items() if v is not None})
    write_metrics(metrics, values)
    return bool(result["promote"])


def promote_champion(verdict: Input[Artifact], pipeline_run_name: str = "") -> str:
    """Point `champion` at the version the gate approved (read from its verdict), recording the move."""
    from e4srec import registry
    from e4srec.stages import deploy as stage

    move = stage.promote_champion(verdict.path, f"kfp:{pipeline_run_name}" if pipeline_run_name else "kfp")
    print(registry.describe(move))
    return move["to"]


def build(image: str = CPU_IMAGE) -> tuple:
    """(deploy, promote_champion) running in `image`."""
    return (dsl.component(deploy, base_image=image, install_kfp_package=False),
            dsl.component(promote_champion, base_image=image, install_kfp_package=False))
