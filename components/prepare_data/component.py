"""KFP component `prepare-data`: a thin shim over `e4srec.stages.prepare_data.run`."""

# No `from __future__ import annotations`: KFP reads the real annotation objects.

from e4srec.images import CPU_IMAGE
from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output


def prepare_data(
    input_uri: str,
    data: Output[Dataset],
    metrics: Output[Metrics],
    format: str = "auto",
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    k_core: int = 0,
    max_len: int = 50,
    n_negatives: int = 99,
    seed: int = 42,
    tracking: bool = True,
    experiment: str = "e4srec",
):
    """Ingest and validate raw interactions, split leave-one-out, sample 99 negatives per user."""
    from e4srec import contracts
    from e4srec.kfp_artifacts import write_metrics
    from e4srec.settings import component_config
    from e4srec.stages import prepare_data as stage

    config = component_config("prepare-data", locals())
    values = stage.run_tracked(config, input_uri, data.path, tracking=tracking, experiment=experiment)
    manifest = contracts.read_json(f"{data.path}/{contracts.MANIFEST}")
    data.metadata.update({k: manifest[k] for k in ("n_users", "n_items", "n_interactions", "item_map_sha256")})
    write_metrics(metrics, values)


def build(image: str = CPU_IMAGE) -> dsl.python_component.PythonComponent:
    """The component running in `image` (which has e4srec and kfp installed)."""
    return dsl.component(prepare_data, base_image=image, install_kfp_package=False)
