"""The E4SRec pipeline: one typed factory, and the thin entry points built on it (compile, local run).

prepare-data -> pretrain-sasrec, and beside them instruction-tune (under dsl.If; else the base
passes through; one task in the local profile); then train-e4srec -> deploy -> promote-champion
(under dsl.If on the verdict), and batch-recommend (under dsl.If on batch_recommend_k) and report
(after deploy, which it reports).
"""

# No `from __future__ import annotations`: KFP reads the real annotation objects.

import functools
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from e4srec_components.batch_recommend import component as batch_recommend_component
from e4srec_components.deploy import component as deploy_component
from e4srec_components.instruction_tune import component as instruction_tune_component
from e4srec_components.prepare_data import component as prepare_data_component
from e4srec_components.pretrain_sasrec import component as pretrain_sasrec_component
from e4srec_components.report import component as report_component
from e4srec_components.train_e4srec import component as train_e4srec_component
from e4srec_pipelines.profiles import Profile, load_profile
from kfp import compiler, dsl, kubernetes

PIPELINE_NAME = "e4srec"


def configure_for(profile: Profile) -> Callable[[dsl.PipelineTask, str], dsl.PipelineTask]:
    """A function applying the profile to a task of a given stage."""

    def configure(task: dsl.PipelineTask, stage: str) -> dsl.PipelineTask:
        """Display name, caching, environment, secrets and (for LLM stages) GPU, image and node selector."""
        task.set_display_name(stage).set_caching_options(profile.caching_for(stage))
        # The run id from the pod's label, not a task input: an input would change every run's cache key
        # (driver/cache.go getFingerPrint hashes every input); the API server labels every pod of a run
        # with it (apiserver/template/v2_template.go RunWorkflow). kfp.local has no pods: `e4srec run` sets it.
        kubernetes.use_field_path_as_env(task, env_name="E4SREC_PIPELINE_RUN_ID",
                                         field_path="metadata.labels['pipeline/runid']")
        for key, value in profile.env.items():
            task.set_env_variable(key, value)
        for secret in profile.secrets:
            kubernetes.use_secret_as_env(task, secret_name=secret["name"], secret_key_to_env=secret["env"],
                                         optional=bool(secret.get("optional", False)))
        pod = profile.pod(stage)
        for key in ("cpu_request", "cpu_limit", "memory_request", "memory_limit"):
            if pod.get(key):
                getattr(task, f"set_{key}")(str(pod[key]))
        # Argo's default retry policy (OnFailure) runs a failed pod again (a crash, an OOM kill, a transient S3
        # or MLflow error), after 1 min, 2 min, ...; train-e4srec then resumes from its checkpoint.
        if pod.get("retries"):
            task.set_retry(num_retries=int(pod["retries"]), backoff_duration="60s", backoff_factor=2.0)
        if pod.get("shm_size"):  # DataLoader workers and NCCL share memory through /dev/shm (64 MiB by default)
            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                       size_limit=str(pod["shm_size"]))
        if profile.image_pull_secrets:
            kubernetes.set_image_pull_secrets(task, list(profile.image_pull_secrets))
        if profile.is_gpu_stage(stage):
            task.set_container_image(profile.gpu_image)
            task.set_accelerator_type(profile.gpu["accelerator"]).set_accelerator_limit(profile.gpu.get("count", 1))
            for key, value in profile.gpu.get("node_selector", {}).items():
                kubernetes.add_node_selector(task, label_key=key, label_value=str(value))
            for toleration in profile.gpu.get("tolerations", []):
                kubernetes.add_toleration(task, **toleration)
        return task

    return configure


def stage_components(profile: Profile) -> dict[str, Any]:
    """{stage: component in the profile's image}: what the pipeline and reruns build on."""
    deploy, promote_champion = deploy_component.build(profile.image)
    return {
        "prepare-data": prepare_data_component.build(profile.image),
        "pretrain-sasrec": pretrain_sasrec_component.build(profile.image),
        "instruction-tune": instruction_tune_component.build(profile.image),
        "instruction-tune (skipped)": instruction_tune_component.build(profile.image, name="instruction-tune-skipped"),
        "train-e4srec": train_e4srec_component.build(profile.image),
        "deploy": deploy,
        "promote-champion": promote_champion,
        "batch-recommend": batch_recommend_component.build(profile.image),
        "report": report_component.build(profile.image),
    }


def check_arguments(arguments: dict[str, Any]) -> None:
    """Build every stage's config from the pipeline's arguments, so that a bad value is one line before
    anything runs or is submitted (the stages build the same configs again from the same values)."""
    from e4srec.stages import (batch_recommend, deploy, instruction_tune, prepare_data, pretrain_sasrec,
                               train_e4srec)

    a = {name: default for name, (_, default, _) in pipeline_parameters().items()} | arguments
    prepare_data.PrepareDataConfig(format=a["input_format"], user_col=a["user_col"], item_col=a["item_col"],
                                   time_col=a["time_col"], k_core=a["k_core"], max_len=a["max_len"],
                                   n_negatives=a["n_negatives"], seed=a["seed"])
    pretrain_sasrec.PretrainSasrecConfig(loss=a["sasrec_loss"], epochs=a["sasrec_epochs"],
                                         batch_size=a["sasrec_batch_size"], lr=a["sasrec_lr"],
                                         dropout=a["sasrec_dropout"], patience=a["sasrec_patience"], seed=a["seed"],
                                         device=a["device"])
    instruction_tune.InstructionTuneConfig(backbone=a["backbone"], dtype=a["backbone_dtype"],
                                           quantization=a["quantization"], max_examples=a["instruct_max_examples"],
                                           epochs=a["instruct_epochs"], batch_size=a["instruct_batch_size"],
                                           lr=a["instruct_lr"], seed=a["seed"], device=a["device"])
    train_e4srec.TrainE4SRecConfig(epochs=a["e4srec_epochs"], batch_size=a["e4srec_batch_size"], lr=a["e4srec_lr"],
                                   max_examples=a["e4srec_max_examples"], eval_users=a["e4srec_eval_users"],
                                   dtype=a["backbone_dtype"], seed=a["seed"], device=a["device"])
    deploy.DeployConfig(registered_model=a["registered_model"], metric=a["gate_metric"],
                        min_margin=a["gate_min_margin"], when_no_champion=a["when_no_champion"],
                        force_promote=a["force_promote"], eval_users=a["e4srec_eval_users"], seed=a["seed"],
                        device=a["device"])
    if a["batch_recommend_k"] < 0:
        from e4srec.errors import E4SRecError

        raise E4SRecError(f"batch_recommend_k={a['batch_recommend_k']}: must be >= 0 (0 skips batch-recommend)")
    if a["batch_recommend_k"]:
        batch_recommend.BatchRecommendConfig(k=a["batch_recommend_k"], device=a["device"])


def create_pipeline(profile: str | Path | Profile = "cluster", *, name: str = PIPELINE_NAME
                    ) -> dsl.graph_component.GraphComponent:
    """Build the pipeline for an environment profile.

    Args:
        profile: `local`, `cluster`, a profile YAML path, or a loaded Profile: images, pipeline root,
            environment variables, Kubernetes secrets, GPU settings and caching (see pipelines/profiles/).
        name: pipeline name shown by Kubeflow and used to prefix local run folders.
    """
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    parts = stage_components(profile)
    configure = configure_for(profile)
    prepare_data, pretrain_sasrec = parts["prepare-data"], parts["pretrain-sasrec"]
    instruction_tune, train_e4srec = parts["instruction-tune"], parts["train-e4srec"]
    deploy, promote_champion = parts["deploy"], parts["promote-champion"]
    batch_recommend, report = parts["batch-recommend"], parts["report"]

    class Outputs(NamedTuple):
        data: dsl.Dataset
        sasrec: dsl.Model
        backbone: dsl.Model
        e4srec: dsl.Model

    @dsl.pipeline(name=name, pipeline_root=profile.pipeline_root or None,
                  description="E4SRec: data preparation, SASRec pre-training, instruction tuning, E4SRec training, "
                              "the promotion gate and the run report, tracked in MLflow.")
    def e4srec_pipeline(
        input_uri: str,
        instructions_uri: str = "",
        input_format: str = "auto",
        user_col: str = "user_id",
        item_col: str = "item_id",
        time_col: str = "timestamp",
        k_core: int = 0,
        max_len: int = 50,
        n_negatives: int = 99,
        seed: int = 42,
        sasrec_loss: str = "bce",
        sasrec_epochs: int = 300,
        sasrec_batch_size: int = 256,
        sasrec_lr: float = 1e-3,
        sasrec_dropout: float = 0.5,
        sasrec_patience: int = 60,
        backbone: str = "smollm2-135m",
        backbone_dtype: str = "auto",
        quantization: str = "none",
        instruction_tune_backbone: bool = False,
        instruct_max_examples: int = 0,
        instruct_epochs: int = 1,
        instruct_batch_size: int = 8,
        instruct_lr: float = 2e-4,
        e4srec_epochs: int = 1,
        e4srec_batch_size: int = 64,
        e4srec_lr: float = 1e-3,
        e4srec_max_examples: int = 0,
        e4srec_eval_users: int = 0,
        registered_model: str = "",
        gate_metric: str = "test/full/NDCG@10",
        gate_min_margin: float = 0.0,
        when_no_champion: str = "promote",
        force_promote: bool = False,
        batch_recommend_k: int = 0,
        device: str = "auto",
        tracking: bool = True,
        experiment: str = "e4srec",
    ) -> Outputs:
        """E4SRec pipeline.

        Args:
            input_uri: raw dataset: an S3-Rec text file or an interactions table (Parquet/CSV/TSV).
            input_format: s3rec, interactions, or auto (by file suffix).
            user_col: user column of an interactions table.
            item_col: item column of an interactions table.
            time_col: timestamp column of an interactions table (numbers or dates; orders each user's items).
            k_core: keep only users and items with at least k interactions (0: off).
            max_len: histories are cut to their last max_len items everywhere.
            n_negatives: sampled negatives per user for the sampled ranking protocol.
            seed: seed for negative sampling and SASRec training.
            sasrec_loss: bce (one sampled negative per position, the paper's) or ce (softmax over all items).
            sasrec_epochs: maximum SASRec epochs; early stopping on validation NDCG@10 usually ends sooner.
            sasrec_batch_size: users per SASRec training batch.
            sasrec_lr: SASRec Adam learning rate.
            sasrec_dropout: SASRec dropout rate.
            sasrec_patience: evaluations without a better validation NDCG@10 before SASRec stops.
            instructions_uri: Alpaca-format instruction data (JSON, JSONL or Parquet) for instruction-tune.
            backbone: LLM spec: smollm2-135m, tiny, gguf:PATH or hf:FOLDER_OR_HUB_ID.
            backbone_dtype: precision of the LLM in instruction-tune and train-e4srec: auto (bf16 on CUDA and
                on CPUs with bf16 units, fp32 on others), fp32, bf16 or fp16.
            quantization: none, 8bit or nf4 (bitsandbytes) for the LLM stages.
            instruction_tune_backbone: run LoRA instruction tuning; off passes the base through (right for
                an already instruction-tuned base such as SmolLM2-Instruct).
            instruct_max_examples: train instruction-tune on the first N examples only (0: all).
            instruct_epochs: instruction-tune passes over the training examples.
            instruct_batch_size: instruction-tune examples per batch.
            instruct_lr: instruction-tune peak learning rate.
            e4srec_epochs: E4SRec passes over the training examples.
            e4srec_batch_size: E4SRec examples per batch (the paper: 16; larger batches need a larger lr).
            e4srec_lr: E4SRec peak learning rate (1e-3 at batch 64).
            e4srec_max_examples: train E4SRec on this many examples drawn with the seed (0: all).
            e4srec_eval_users: evaluate E4SRec on this many users drawn with the seed (0: all); the
                deploy gate compares challenger and champion on the same users.
            registered_model: MLflow registered model name (default: e4srec-<dataset>).
            gate_metric: metric the promotion gate compares, e.g. test/full/NDCG@10.
            gate_min_margin: the run's better model (E4SRec or SASRec) must beat the champion by more than this.
            when_no_champion: promote (the better of the run's E4SRec and SASRec) or hold when the registered
                model has no champion yet.
            force_promote: make the run's E4SRec champion whatever the gate says (recorded as forced).
            batch_recommend_k: write the top-k items of every user (Parquet) with this k; 0 skips it.
            device: cpu, cuda, cuda:N or auto for the training stages.
            tracking: log every stage to MLflow (one parent run, a nested run per stage); off: deploy
                registers nothing and holds (the registry needs tracking).
            experiment: MLflow experiment name.
        """
        run_name = dsl.PIPELINE_JOB_NAME_PLACEHOLDER  # only for the uncached stages (report title, parent run name)
        data = prepare_data(
            input_uri=input_uri, format=input_format, user_col=user_col, item_col=item_col, time_col=time_col,
            k_core=k_core, max_len=max_len, n_negatives=n_negatives,
            seed=seed, tracking=tracking, experiment=experiment,
        )
        configure(data, "prepare-data")
        sasrec = pretrain_sasrec(
            data=data.outputs["data"], loss=sasrec_loss, epochs=sasrec_epochs, batch_size=sasrec_batch_size,
            lr=sasrec_lr, dropout=sasrec_dropout, patience=sasrec_patience, seed=seed, device=device,
            tracking=tracking, experiment=experiment,
        )
        configure(sasrec, "pretrain-sasrec")
        llm_args = dict(backbone_spec=backbone, dtype=backbone_dtype, quantization=quantization, seed=seed,
                        device=device, tracking=tracking, experiment=experiment)
        tuning = dict(instructions_uri=instructions_uri, max_examples=instruct_max_examples, epochs=instruct_epochs,
                      batch_size=instruct_batch_size, lr=instruct_lr, **llm_args)
        # The backbone travels as an artifact like every other output: the launcher downloads it for train-e4srec.
        if profile.instruction_tune_branches:
            with dsl.If(instruction_tune_backbone == True):  # noqa: E712 (a KFP condition, not a Python test)
                tuned = instruction_tune(**tuning)
                configure(tuned, "instruction-tune")
            with dsl.Else():
                # its own component name, so that its task (and its artifacts' path) is instruction-tune-skipped
                # rather than the compiler's instruction-tune-2
                base = parts["instruction-tune (skipped)"](instructions_uri=instructions_uri, skip=True, **llm_args)
                configure(base, "instruction-tune (skipped)")  # no GPU for a pass-through
            llm = dsl.OneOf(tuned.outputs["backbone"], base.outputs["backbone"])
        else:  # one task (see Profile.instruction_tune_branches)
            single = instruction_tune(tune=instruction_tune_backbone, **tuning)
            configure(single, "instruction-tune")
            llm = single.outputs["backbone"]
        # On a cluster, checkpoints on a PVC: a retried pod of the same run resumes where the lost one stopped
        # ({run_id} is filled in from the pod's run-id label, so the task's inputs stay the same every run).
        resume = (dict(checkpoint_every=int(profile.checkpoints.get("every", 500)), resume=True,
                       checkpoint_dir=f"{profile.checkpoints['mount_path'].rstrip('/')}/{{run_id}}/train-e4srec")
                  if profile.checkpoints else {})
        e4srec = train_e4srec(
            data=data.outputs["data"], sasrec=sasrec.outputs["model"], llm=llm, epochs=e4srec_epochs, **resume,
            batch_size=e4srec_batch_size, lr=e4srec_lr, max_examples=e4srec_max_examples,
            eval_users=e4srec_eval_users, dtype=backbone_dtype, seed=seed, device=device, tracking=tracking,
            experiment=experiment,
        )
        configure(e4srec, "train-e4srec")
        if profile.checkpoints:
            kubernetes.mount_pvc(e4srec, pvc_name=profile.checkpoints["pvc"],
                                 mount_path=profile.checkpoints["mount_path"])
        # Not nested under an If on `tracking`: kfp.local cannot resolve a condition inside a condition on a
        # task output. deploy itself returns promote=False, registering nothing, when tracking is off.
        gate = deploy(
            model=e4srec.outputs["model"], sasrec=sasrec.outputs["model"], data=data.outputs["data"],
            registered_model=registered_model,
            metric=gate_metric, min_margin=gate_min_margin, when_no_champion=when_no_champion,
            force_promote=force_promote, eval_users=e4srec_eval_users, seed=seed, device=device,
            tracking=tracking, experiment=experiment, pipeline_run_name=run_name,
        )
        configure(gate, "deploy")
        # The report shows the champion's alias history: in the promoting branch it runs after the promotion
        # (a task outside the branch cannot wait on one inside it), in the other right after deploy.
        report_args = dict(data=data.outputs["data"], sasrec=sasrec.outputs["model"], e4srec=e4srec.outputs["model"],
                           verdict=gate.outputs["verdict"], tracking=tracking, experiment=experiment,
                           pipeline_run_name=run_name)
        with dsl.If(gate.outputs["Output"] == True):  # noqa: E712 (the gate, visible in the DAG)
            promoted = configure(promote_champion(verdict=gate.outputs["verdict"], pipeline_run_name=run_name),
                                 "promote-champion")
            configure(report(**report_args).after(promoted), "report")
        with dsl.Else():
            configure(report(**report_args), "report")
        with dsl.If(batch_recommend_k > 0):
            configure(batch_recommend(model=e4srec.outputs["model"], data=data.outputs["data"], k=batch_recommend_k,
                                      device=device, tracking=tracking, experiment=experiment),
                      "batch-recommend")
        return Outputs(data=data.outputs["data"], sasrec=sasrec.outputs["model"], backbone=llm,
                       e4srec=e4srec.outputs["model"])

    return e4srec_pipeline


def compile_pipeline(output: Path | str = "pipeline.yaml", **factory_args: Any) -> Path:
    """Compile `create_pipeline(**factory_args)` (the cluster profile unless told) to KFP IR YAML."""
    output = Path(output)
    compiler.Compiler().compile(create_pipeline(**factory_args), str(output))
    return output


@functools.cache
def pipeline_parameters() -> dict[str, tuple[type, Any, str]]:
    """{name: (type, default, help)} of the pipeline's runtime parameters, read from its signature (built
    once per process: the CLI's parser and `check_arguments` both ask)."""
    func = create_pipeline("local").pipeline_func
    doc = inspect.getdoc(func) or ""
    helps = dict(re.findall(r"^\s{4}(\w+): (.+(?:\n\s{8}.+)*)", doc, flags=re.M))
    out = {}
    for name, p in inspect.signature(func).parameters.items():
        default = None if p.default is inspect.Parameter.empty else p.default
        out[name] = (p.annotation if isinstance(p.annotation, type) else eval(p.annotation), default,
                     " ".join(helps.get(name, "").split()))
    return out
