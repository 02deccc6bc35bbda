"""KFP component `batch-recommend`: a thin shim over `e4srec.stages.batch_recommend.run`."""

# No `from __future__ import annotations`: KFP reads the real annotation objects.
from e4srec.images import CPU_IMAGE
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output


def batch_recommend(
    model: Input[Model],
    data: Input[Dataset],
    recommendations: Output[Dataset],
    metrics: Output[Metrics],
    k: int = 10,
    batch_size: int = 64,
    max_users: int = 0,
    device: str = "auto",
    tracking: bool = True,
    experiment: str = "e4srec",
):
    """Top-k original item ids for every user of the dataset, as recommendations.parquet."""
    from e4srec.kfp_artifacts import write_metrics
    from e4srec.settings import component_config
    from e4srec.stages import batch_recommend as stage

    config = component_config("batch-recommend", locals())
    values = stage.run_tracked(config, model.path, data.path, recommendations.path, tracking=tracking,
                               experiment=experiment)
    recommendations.metadata.update({"k": k, "users": int(values["batch/users"])})
    write_metrics(metrics, values)


def build(image: str = CPU_IMAGE) -> dsl.python_component.PythonComponent:
    """The component running in `image` (which has e4srec and kfp installed)."""
    return dsl.component(batch_recommend, base_image=image, install_kfp_package=False)
