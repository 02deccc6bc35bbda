"""The pipeline commands: run (here, through kfp.local), submit (to Kubeflow), rerun one stage, runs, compile."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from e4srec.commands import Command
from e4srec.errors import E4SRecError

# The inputs `run` and `submit` take as --input and --instructions; every other parameter is a flag of its name.
INPUT_PARAMETERS = ("input_uri", "instructions_uri")


def add_pipeline_parameters(p: argparse.ArgumentParser) -> None:
    """One flag per pipeline parameter (e4srec.settings.PIPELINE), with its type, default and help."""
    from e4srec.settings import PIPELINE

    g = p.add_argument_group("pipeline parameters")
    for q in PIPELINE:
        if q.name in INPUT_PARAMETERS:
            continue
        flag = "--" + q.name.replace("_", "-")
        if q.annotation is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=q.default, help=q.help_text)
        else:
            g.add_argument(flag, type=q.annotation, default=q.default, help=q.help_text)


def pipeline_arguments(args: argparse.Namespace) -> dict:
    from e4srec.settings import PIPELINE

    return {q.name: getattr(args, q.name) for q in PIPELINE if q.name not in INPUT_PARAMETERS}


def add_kubeflow(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Kubeflow")
    g.add_argument("--host", help="Kubeflow Pipelines API endpoint, e.g. https://kubeflow.example.com/pipeline")
    g.add_argument("--namespace", help="Kubeflow profile namespace (multi-user clusters)")
    g.add_argument("--kfp-experiment", default="e4srec", help="KFP experiment the run is filed under (default: e4srec)")
    g.add_argument("--run-name", help="KFP run name")
    auth = g.add_mutually_exclusive_group()
    auth.add_argument("--token", default=os.environ.get("KFP_TOKEN"), help="bearer token (default: $KFP_TOKEN)")
    auth.add_argument("--cookie", help="session cookie of an auth proxy, e.g. 'authservice_session=...'")


def run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", type=str, default=Path("data/Beauty.txt"), help="raw dataset")
    p.add_argument("--instructions", type=str, default=Path("data/instructions.json"),
                   help="Alpaca-format data for instruction-tune")
    p.add_argument("--pipeline-root", type=Path, default=Path("runs"), help="where task outputs land")
    p.add_argument("--verbose", action="store_true", help="show the tasks' whole output (KFP executor input, "
                                                          "library warnings, tracebacks)")
    add_pipeline_parameters(p)


def run(args: argparse.Namespace) -> int:
    from e4srec.local import run_local

    return run_local(input_path=args.input, instructions=args.instructions, pipeline_root=args.pipeline_root,
                     params=pipeline_arguments(args), verbose=args.verbose)


def submit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="raw dataset URI, e.g. s3://bucket/raw/Beauty.txt")
    p.add_argument("--instructions", help="instruction data URI (for --instruction-tune-backbone)")
    p.add_argument("--profile", default="cluster", help="cluster, local, or a profile YAML")
    p.add_argument("--pipeline-root", help="where the run's artifacts go, e.g. s3://bucket/root (default: the "
                                           "profile's pipeline_root; empty: the kfp-launcher ConfigMap's default)")
    p.add_argument("--upload", metavar="NAME", help="upload the compiled pipeline as a new version of the named "
                                                    "pipeline (created when missing) and run that version")
    p.add_argument("--schedule", metavar="CRON", help="create a recurring run on this cron schedule (5 fields, or "
                                                      "KFP's 6 with seconds) instead of a single run")
    add_kubeflow(p)
    add_pipeline_parameters(p)


def submit(args: argparse.Namespace) -> int:
    from e4srec_pipelines.submit import submit

    host = args.host or os.environ.get("KF_PIPELINES_ENDPOINT")
    if not host:
        raise E4SRecError("submit needs --host (the Kubeflow Pipelines API URL) or KF_PIPELINES_ENDPOINT")
    arguments = pipeline_arguments(args) | {"input_uri": args.input, "instructions_uri": args.instructions or ""}
    result = submit(arguments, host=host, profile=args.profile, namespace=args.namespace,
                    experiment=args.kfp_experiment, run_name=args.run_name, token=args.token, cookie=args.cookie,
                    pipeline_root=args.pipeline_root, upload=args.upload, schedule=args.schedule)
    if result.version_id:
        print(f"uploaded pipeline {args.upload!r} version {result.version_name} ({result.pipeline_id} / "
              f"{result.version_id})")
    print(f"submitted {result.kind} {result.id} to {host} (KFP experiment {args.kfp_experiment}, profile "
          f"{args.profile}, pipeline root {result.pipeline_root or 'the kfp-launcher ConfigMap default'}"
          + (f", schedule {args.schedule!r}" if args.schedule else "") + ")")
    return 0


def rerun_arguments(p: argparse.ArgumentParser) -> None:
    from e4srec.commands.stages import STAGES

    p.add_argument("stage", choices=[s.name for s in STAGES if s.name != "prepare-data"],
                   help="the stage to run again (prepare-data reads the raw input: start a new run instead)")
    p.add_argument("--from", dest="from_run", required=True,
                   help="the earlier run: its folder (runs/e4srec-...), or with --host its Kubeflow run id")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a stage parameter (its component's), repeatable: --set epochs=5 --set loss=ce; the others "
                        "are the ones the earlier run gave the stage")
    p.add_argument("--input-override", action="append", default=[], metavar="INPUT=URI",
                   help="take one input from elsewhere, e.g. --input-override sasrec=s3://bucket/x/model")
    p.add_argument("--profile", help="local (run here; the default), cluster (the default with --host), or a "
                                      "profile YAML")
    p.add_argument("--pipeline-root", type=Path, default=Path("runs"), help="where a local rerun's outputs land")
    p.add_argument("--verbose", action="store_true", help="show the task's whole output (a local rerun)")
    add_kubeflow(p)


def rerun(args: argparse.Namespace) -> int:
    from e4srec_pipelines.submit import earlier_run, rerun_pipeline, submit

    overrides = dict(item.split("=", 1) for item in args.input_override)
    if args.profile is None:
        args.profile = "cluster" if args.host else "local"
    elif args.host and args.profile == "local":
        raise E4SRecError("rerun --host runs on Kubeflow, the local profile on this machine: drop --profile local "
                          "(the cluster profile is the default with --host) or pass your cluster profile YAML")
    earlier = earlier_run(args.from_run, host=args.host, token=args.token, cookie=args.cookie,
                          namespace=args.namespace)
    pipeline = rerun_pipeline(args.stage, earlier, args.set, profile=args.profile, overrides=overrides)
    if args.host:
        result = submit({}, host=args.host, pipeline=pipeline, profile=args.profile, namespace=args.namespace,
                        experiment=args.kfp_experiment, run_name=args.run_name, token=args.token, cookie=args.cookie)
        print(f"submitted rerun of {args.stage}: run {result.id}")
        return 0
    import time
    import uuid

    from e4srec.local import run_one_stage

    # A rerun is a pipeline run of its own in MLflow (a parent run with the stage nested), linked to its source.
    os.environ["E4SREC_PIPELINE_RUN_ID"] = str(uuid.uuid4())
    os.environ["E4SREC_PIPELINE_RUN_NAME"] = f"rerun-{args.stage}-of-{earlier.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.environ["E4SREC_RERUN_OF"] = earlier.run_id or earlier.name
    return run_one_stage(pipeline, args.pipeline_root, verbose=args.verbose)


def runs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", default="e4srec", help="MLflow experiment name")
    p.add_argument("--limit", type=int, default=20, help="how many runs")


def runs(args: argparse.Namespace) -> int:
    from e4srec.tracking import check_server, pipeline_runs

    check_server()
    rows = pipeline_runs(args.experiment, args.limit)
    if not rows:
        print(f"no pipeline runs in experiment {args.experiment!r} at "
              f"{os.environ.get('MLFLOW_TRACKING_URI', 'sqlite:///mlflow.db')}")
        return 0

    def metric(m: dict, key: str) -> str:
        return f"{m[key]:.4f}" if key in m else "-"

    print(f"{'started':16}  {'status':8}  {'users':>6}  {'SASRec':>7}  {'E4SRec':>7}  {'gate':7}  pipeline run "
          f"(test/full/NDCG@10; registered versions and their aliases now)")
    for r in rows:
        m = r["metrics"]
        users = f"{int(m['prepare-data/data/users']):,}" if "prepare-data/data/users" in m else "-"
        gate = {1.0: "promote", 0.0: "hold"}.get(m.get("deploy/deploy/promote"), "-")
        name = r["name"] + (f" (rerun of {r['rerun_of'][:12]})" if r["rerun_of"] else "")
        print(f"{r['started']:16}  {r['status']:8}  {users:>6}  {metric(m, 'pretrain-sasrec/test/full/NDCG_at_10'):>7}  "
              f"{metric(m, 'train-e4srec/test/full/NDCG_at_10'):>7}  {gate:7}  {name}")
        for version in r["registered"]:
            print(f"{'':56}{version}")
    return 0


def compile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", type=str, default="pipeline.yaml", help="YAML file to write")
    p.add_argument("--profile", default="cluster", help="local, cluster, or a profile YAML (images, pipeline root, "
                                                      "environment, secrets, GPUs, caching)")


def compile_(args: argparse.Namespace) -> int:
    from e4srec_pipelines import compile_pipeline

    path = compile_pipeline(args.output, profile=args.profile)
    print(f"wrote {path} (profile {args.profile})")
    return 0


COMMANDS = (
    Command("run", "run the whole pipeline locally (kfp.local)",
            "Run the pipeline on this machine through kfp.local's SubprocessRunner; MLflow runs go to "
            "MLFLOW_TRACKING_URI or sqlite:///mlflow.db here.", run_arguments, run, show_defaults=True),
    Command("submit", "compile and start a run on Kubeflow Pipelines",
            "Compile the pipeline for a profile (default: cluster) and create a run through kfp.Client. Inputs are "
            "URIs the cluster can read (s3://...).", submit_arguments, submit, show_defaults=True),
    Command("rerun", "rerun one stage on an earlier run's outputs",
            "Build a one-stage pipeline whose inputs are an earlier run's outputs, brought in with dsl.importer; run "
            "it here (kfp.local) or, with --host, on Kubeflow.", rerun_arguments, rerun),
    Command("runs", "list the latest pipeline runs tracked in MLflow",
            "The pipeline runs of an MLflow experiment, newest first: when, status, users, SASRec and E4SRec test "
            "NDCG@10, the gate's verdict, reruns and the model versions each registered (with their aliases now).",
            runs_arguments, runs, show_defaults=True),
    Command("compile", "compile the pipeline to KFP IR YAML",
            "Write the Kubeflow Pipelines spec that `kfp` clients and the UI upload.", compile_arguments, compile_,
            show_defaults=True),
)
