"""KFP component `instruction-tune`: a thin shim over `e4srec.stages.instruction_tune.run`."""

# No `from __future__ import annotations`: KFP reads the real annotation objects.
from e4srec.images import CPU_IMAGE
from kfp import dsl
from kfp.dsl import Metrics, Model, Output


def instruction_tune(
    instructions_uri: str,
    backbone: Output[Model],
    metrics: Output[Metrics],
    backbone_spec: str = "smollm2-135m",
    dtype: str = "auto",
    quantization: str = "none",
    local_files_only: bool = True,
    skip: bool = False,
    tune: bool = True,
    holdout: int = 100,
    max_examples: int = 0,
    epochs: int = 1,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 2e-4,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    max_length: int = 256,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    merge: bool = False,
    generations: int = 3,
    max_new_tokens: int = 48,
    seed: int = 42,
    device: str = "auto",
    threads: int = 0,
    tracking: bool = True,
    experiment: str = "e4srec",
):
    """LoRA SFT of the backbone on Alpaca data, or (skip, or not tune) the base passed through, as the
    `backbone` artifact. `tune` is the pipeline parameter's sense of the same switch."""
    from e4srec.kfp_artifacts import write_metrics
    from e4srec.settings import component_config
    from e4srec.stages import instruction_tune as stage

    config = component_config("instruction-tune", locals())
    values = stage.run_tracked(config, instructions_uri or None, backbone.path, tracking=tracking,
                               experiment=experiment)
    backbone.metadata.update({"backbone": backbone_spec, "skipped": config.skip, "quantization": quantization})
    write_metrics(metrics, values)


def build(image: str = CPU_IMAGE, name: str = "") -> dsl.python_component.PythonComponent:
    """The component running in `image` (which has e4srec and kfp installed); `name` replaces the
    component's name (the pipeline's pass-through branch is `instruction-tune-skipped`, the task and
    artifact-path name a user sees, instead of the compiler's `instruction-tune-2`)."""
    component = dsl.component(instruction_tune, base_image=image, install_kfp_package=False)
    if name:
        component.component_spec.name = name
    return component
