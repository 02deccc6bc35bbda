"""KFP component `train-e4srec`: a thin shim over `e4srec.stages.train_e4srec.run`."""

# No `from __future__ import annotations`: KFP reads the real annotation objects.
from e4srec.images import CPU_IMAGE
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output


def train_e4srec(
    data: Input[Dataset],
    sasrec: Input[Model],
    backbone: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    instruction: str = "Given the user's purchase history, predict next possible item to be purchased.",
    response_prefix: str = "\n\n### Response:\n",
    epochs: int = 1,
    batch_size: int = 64,
    grad_accum: int = 1,
    lr: float = 1e-3,
    warmup_ratio: float = 0.05,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    item_dim: int = 64,
    lora_r: int = 16,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    target_modules: str = "gate_proj,up_proj,down_proj",
    head_init: str = "items",
    dtype: str = "auto",
    autocast: bool = False,
    max_targets_per_user: int = 50,
    max_examples: int = 0,
    eval_users: int = 0,
    eval_batch_size: int = 64,
    prefix_cache: bool = True,
    shared_prefix: bool = True,
    bucket_by_length: bool = True,
    checkpoint_every: int = 0,
    checkpoint_dir: str = "",
    resume: bool = False,
    seed: int = 42,
    device: str = "auto",
    threads: int = 0,
    nproc_per_node: int = 1,
    tracking: bool = True,
    experiment: str = "e4srec",
):
    """Train E4SRec (frozen LLM, LoRA, projection, item head) and rank the whole catalog.

    `nproc_per_node` > 1 trains data-parallel over that many processes in the pod (one per GPU) with torchrun.
    """
    from e4srec import contracts
    from e4srec.e4srec import CONFIG
    from e4srec.kfp_artifacts import write_metrics
    from e4srec.settings import component_config
    from e4srec.stages import train_e4srec as stage

    config = component_config("train-e4srec", locals())
    run = stage.run_tracked if nproc_per_node <= 1 else stage.run_distributed
    extra = {} if nproc_per_node <= 1 else {"nproc": nproc_per_node}
    values = run(config, data.path, sasrec.path, backbone.path, model.path, tracking=tracking, experiment=experiment,
                 **extra)
    saved = contracts.read_json(f"{model.path}/{CONFIG}")
    model.metadata.update({"item_map_sha256": saved["item_map_sha256"], "backbone": saved["backbone"]["backbone"],
                           "kind": "e4srec", "framework": "pytorch+peft"})
    write_metrics(metrics, values)


def build(image: str = CPU_IMAGE) -> dsl.python_component.PythonComponent:
    """The component running in `image` (which has e4srec and kfp installed)."""
    return dsl.component(train_e4srec, base_image=image, install_kfp_package=False)
