"""The E4SRec pipeline: one typed factory, and the thin entry points built on it (compile, local run).

prepare-data -> pretrain-sasrec, and beside them instruction-tune (under dsl.If; else the base
passes through; one task in the local profile); then train-e4srec -> deploy -> promote-champion
(under dsl.If on the verdict), and batch-recommend (under dsl.If on batch_recommend_k) and report
(after deploy, which it reports). The runtime parameters, their types, defaults and docs, and which
stage settings each one sets, are e4srec.settings.PIPELINE: the factory gives the pipeline function
that signature and passes each stage its settings with `stage_arguments`.
"""

# No `from __future__ import annotations`: KFP reads the real annotation objects.

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from e4srec.settings import PIPELINE, stage_arguments
from e4srec_components.batch_recommend import component as batch_recommend_component
from e4srec_components.deploy import component as deploy_component
from e4srec_components.instruction_tune import component as instruction_tune_component
from e4srec_components.prepare_data import component as prepare_data_component
from e4srec_components.pretrain_sasrec import component as pretrain_sasrec_component
from e4srec_components.report import component as report_component
from e4srec_components.train_e4srec import component as train_e4srec_component
from e4srec_pipelines.profiles import Profile, load_profile
from kfp import compiler, dsl, kubernetes

PARAMETERS = [q.name for q in PIPELINE]
DESCRIPTION = ("E4SRec: data preparation, SASRec pre-training, instruction tuning, E4SRec training, the promotion "
               "gate and the run report, tracked in MLflow.")

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

    def e4srec_pipeline(*values: Any) -> Outputs:
        """The pipeline's graph; its parameters (signature and docs, set below) come from e4srec.settings."""
        p = dict(zip(PARAMETERS, values))
        track = dict(tracking=p["tracking"], experiment=p["experiment"])

        def settings(stage: str) -> dict[str, Any]:
            return stage_arguments(stage, p) | track

        run_name = dsl.PIPELINE_JOB_NAME_PLACEHOLDER  # only for the uncached stages (report title, parent run name)
        data = prepare_data(input_uri=p["input_uri"], **settings("prepare-data"))
        configure(data, "prepare-data")
        sasrec = pretrain_sasrec(data=data.outputs["data"], **settings("pretrain-sasrec"))
        configure(sasrec, "pretrain-sasrec")
        tuning = dict(instructions_uri=p["instructions_uri"], **settings("instruction-tune"))
        # the pass-through: the backbone's own fields only (the tuning settings would change its cache key)
        pass_through = {k: tuning[k] for k in ("backbone_spec", "dtype", "quantization", "seed", "device", *track)}
        # The backbone travels as an artifact like every other output: the launcher downloads it for train-e4srec.
        if profile.instruction_tune_branches:
            with dsl.If(p["instruction_tune_backbone"] == True):  # noqa: E712 (a KFP condition, not a Python test)
                tuned = instruction_tune(**tuning)
                configure(tuned, "instruction-tune")
            with dsl.Else():
                # its own component name, so that its task (and its artifacts' path) is instruction-tune-skipped
                # rather than the compiler's instruction-tune-2
                base = parts["instruction-tune (skipped)"](instructions_uri=p["instructions_uri"], skip=True,
                                                           **pass_through)
                configure(base, "instruction-tune (skipped)")  # no GPU for a pass-through
            backbone = dsl.OneOf(tuned.outputs["backbone"], base.outputs["backbone"])
        else:  # one task (see Profile.instruction_tune_branches)
            single = instruction_tune(tune=p["instruction_tune_backbone"], **tuning)
            configure(single, "instruction-tune")
            backbone = single.outputs["backbone"]
        # On a cluster, checkpoints on a PVC: a retried pod of the same run resumes where the lost one stopped
        # ({run_id} is filled in from the pod's run-id label, so the task's inputs stay the same every run).
        resume = (dict(checkpoint_every=int(profile.checkpoints.get("every", 500)), resume=True,
                       checkpoint_dir=f"{profile.checkpoints['mount_path'].rstrip('/')}/{{run_id}}/train-e4srec")
                  if profile.checkpoints else {})
        e4srec = train_e4srec(data=data.outputs["data"], sasrec=sasrec.outputs["model"], backbone=backbone, **resume,
                              **settings("train-e4srec"))
        configure(e4srec, "train-e4srec")
        if profile.checkpoints:
            kubernetes.mount_pvc(e4srec, pvc_name=profile.checkpoints["pvc"],
                                 mount_path=profile.checkpoints["mount_path"])
        # Not nested under an If on `tracking`: kfp.local cannot resolve a condition inside a condition on a
        # task output. deploy itself returns promote=False, registering nothing, when tracking is off.
        gate = deploy(model=e4srec.outputs["model"], sasrec=sasrec.outputs["model"], data=data.outputs["data"],
                      pipeline_run_name=run_name, **settings("deploy"))
        configure(gate, "deploy")
        # The report shows the champion's alias history: in the promoting branch it runs after the promotion
        # (a task outside the branch cannot wait on one inside it), in the other right after deploy.
        report_args = dict(data=data.outputs["data"], sasrec=sasrec.outputs["model"], e4srec=e4srec.outputs["model"],
                           verdict=gate.outputs["verdict"], pipeline_run_name=run_name, **track)
        with dsl.If(gate.outputs["Output"] == True):  # noqa: E712 (the gate, visible in the DAG)
            promoted = configure(promote_champion(verdict=gate.outputs["verdict"], pipeline_run_name=run_name),
                                 "promote-champion")
            configure(report(**report_args).after(promoted), "report")
        with dsl.Else():
            configure(report(**report_args), "report")
        with dsl.If(p["batch_recommend_k"] > 0):
            configure(batch_recommend(model=e4srec.outputs["model"], data=data.outputs["data"],
                                      k=p["batch_recommend_k"], **settings("batch-recommend")), "batch-recommend")
        return Outputs(data=data.outputs["data"], sasrec=sasrec.outputs["model"], backbone=backbone,
                       e4srec=e4srec.outputs["model"])

    e4srec_pipeline.__signature__ = inspect.Signature(
        [inspect.Parameter(q.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=q.default, annotation=q.annotation)
         for q in PIPELINE], return_annotation=Outputs)
    e4srec_pipeline.__doc__ = "E4SRec pipeline.\n\nArgs:\n" + "".join(
        f"    {q.name}: {q.help_text}\n" for q in PIPELINE)
    return dsl.pipeline(name=name, pipeline_root=profile.pipeline_root or None, description=DESCRIPTION)(
        e4srec_pipeline)


def compile_pipeline(output: Path | str = "pipeline.yaml", **factory_args: Any) -> Path:
    """Compile `create_pipeline(**factory_args)` (the cluster profile unless told) to KFP IR YAML."""
    output = Path(output)
    compiler.Compiler().compile(create_pipeline(**factory_args), str(output))
    return output
