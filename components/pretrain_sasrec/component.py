"""KFP component `pretrain-sasrec`: a thin shim over `e4srec.stages.pretrain_sasrec.run`."""

# No `from __future__ import annotations`: KFP reads the real annotation objects.

from e4srec.images import CPU_IMAGE
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output


def pretrain_sasrec(
    data: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    loss: str = "bce",
    arch: str = "kang",
    epochs: int = 300,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    dim: int = 64,
    n_blocks: int = 2,
    n_heads: int = 1,
    dropout: float = 0.5,
    eval_every: int = 1,
    patience: int = 60,
    eval_batch_size: int = 1024,
    bucket_by_length: bool = True,
    seed: int = 42,
    device: str = "auto",
    threads: int = 0,
    tracking: bool = True,
    experiment: str = "e4srec",
):
    """Train SASRec with early stopping; export weights, 64-d item embeddings and the item map."""
    from e4srec import contracts, sasrec
    from e4srec.kfp_artifacts import write_metrics
    from e4srec.settings import component_config
    from e4srec.stages import pretrain_sasrec as stage

    config = component_config("pretrain-sasrec", locals())
    values = stage.run_tracked(config, data.path, model.path, tracking=tracking, experiment=experiment,
                               progress=True)
    saved = contracts.read_json(f"{model.path}/{sasrec.CONFIG}")
    model.metadata.update({"item_map_sha256": saved["item_map_sha256"], "best_epoch": saved["best_epoch"],
                           "framework": "pytorch", "kind": "sasrec", "loss": loss})
    write_metrics(metrics, values)


def build(image: str = CPU_IMAGE) -> dsl.python_component.PythonComponent:
    """The component running in `image` (which has e4srec and kfp installed)."""
    return dsl.component(pretrain_sasrec, base_image=image, install_kfp_package=False)
