"""`e4srec`: one subcommand per stage, plus the pipeline (run, compile, submit, rerun), the registry
(promote), serving (recommend), extend-items, evaluate and backbones.

Stage commands share one convention: inputs as named options, `--output DIR`, `metrics.json`
written into the output (report writes its page instead), MLflow tracking on unless `--no-tracking`
(deploy always tracks: it registers). Heavy imports happen inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from e4srec import config as cfg
from e4srec.errors import E4SRecError, Stopped


def _tracking_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tracking")
    g.add_argument("--tracking", action=argparse.BooleanOptionalAction, default=True,
                   help="log params, curves, metrics and artifacts to MLflow (MLFLOW_TRACKING_URI, "
                        "else sqlite:///mlflow.db here) (default: on)")
    g.add_argument("--experiment", default="e4srec", help="MLflow experiment name (default: e4srec)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")


def _print_metrics(metrics: dict[str, float], title: str) -> None:
    from e4srec.evaluate import format_table

    print(format_table({title: metrics}))


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from e4srec.stages import prepare_data as stage

    config = cfg.from_namespace(stage.PrepareDataConfig, args)
    metrics = stage.run_tracked(config, args.input, args.output, overwrite=args.overwrite,
                                tracking=args.tracking, experiment=args.experiment)
    print(json.dumps(metrics, indent=1))
    print(f"wrote {args.output}")
    return 0


def cmd_pretrain_sasrec(args: argparse.Namespace) -> int:
    from e4srec.stages import pretrain_sasrec as stage

    config = cfg.from_namespace(stage.PretrainSasrecConfig, args)
    metrics = stage.run_tracked(config, args.data, args.output, overwrite=args.overwrite,
                                tracking=args.tracking, experiment=args.experiment)
    _print_metrics(metrics, "SASRec")
    print(f"wrote {args.output}")
    return 0


def cmd_instruction_tune(args: argparse.Namespace) -> int:
    from e4srec.stages import instruction_tune as stage

    config = cfg.from_namespace(stage.InstructionTuneConfig, args)
    metrics = stage.run_tracked(config, args.instructions, args.output, overwrite=args.overwrite,
                                tracking=args.tracking, experiment=args.experiment)
    print(json.dumps(metrics, indent=1))
    print(f"wrote {args.output}")
    return 0


def cmd_train_e4srec(args: argparse.Namespace) -> int:
    from e4srec.stages import train_e4srec as stage

    config = cfg.from_namespace(stage.TrainE4SRecConfig, args)
    metrics = stage.run_tracked(config, args.data, args.sasrec, args.llm, args.output, overwrite=args.overwrite,
                                tracking=args.tracking, experiment=args.experiment)  # run id: from the environment
    if metrics:  # rank 0 (under torchrun the other processes return nothing)
        _print_metrics(metrics, "E4SRec")
        print(f"wrote {args.output}")
    return 0


def cmd_extend_items(args: argparse.Namespace) -> int:
    from e4srec.extend import extend_items

    summary = extend_items(args.model, args.new_items, args.output, overwrite=args.overwrite)
    print(f"added {summary['items_added']} items to {summary['items_before']}; item map "
          f"{summary['item_map_sha256'][:12]}; wrote {args.output}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from e4srec import registry
    from e4srec.stages import deploy as stage

    config = cfg.from_namespace(stage.DeployConfig, args)
    _, verdict = stage.run_tracked(config, args.model, args.sasrec, args.data, args.output, apply=args.apply,
                                   overwrite=args.overwrite, experiment=args.experiment)
    for line in stage.summary(verdict):
        print(line)
    if verdict["promote"] and args.apply:
        print(f"champion -> version {verdict['challenger_version']}; serve it with:")
        print(f"  {registry.serve_command(verdict['registered_model'])}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from e4srec import registry

    if args.history:
        registry.check_exists(args.name)
        for move in registry.alias_history(args.name):
            print(registry.describe(move))
        return 0
    move = registry.promote(args.name, to_version=args.version, rollback=args.rollback, force=args.force)
    print(f"{args.name}: {registry.describe(move)}")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    if str(args.model).startswith("models:/"):
        if args.dtype:
            raise E4SRecError("--dtype applies to a model folder; a registered model serves as it was logged")
        import mlflow
        import pandas as pd

        from mlflow.exceptions import MlflowException

        try:
            model = mlflow.pyfunc.load_model(str(args.model))
            frame = model.predict(pd.DataFrame({"history": [args.history], "k": [args.k]}))
        except MlflowException as e:  # an unknown name or alias, a refused request
            raise E4SRecError(f"{args.model}: {str(e.message).splitlines()[0]}") from None
        row = frame.iloc[0]
        items, scores, unknown = list(row["items"]), list(row["scores"]), list(row["unknown_items"])
    else:
        from e4srec.recommend import Recommender

        result = Recommender(args.model, dtype=args.dtype).recommend([args.history], args.k)[0]
        items, scores, unknown = result.items, result.scores, result.unknown_items
    if unknown:
        print(f"warning: unknown item ids dropped: {' '.join(unknown)}", file=sys.stderr)
    print(json.dumps({"items": items, "scores": scores, "unknown_items": unknown}))
    return 0


def cmd_batch_recommend(args: argparse.Namespace) -> int:
    from e4srec.stages import batch_recommend as stage

    config = cfg.from_namespace(stage.BatchRecommendConfig, args)
    metrics = stage.run_tracked(config, args.model, args.data, args.output, overwrite=args.overwrite,
                                tracking=args.tracking, experiment=args.experiment)
    print(f"{int(metrics['batch/users']):,} users, {metrics['batch/users_per_second']:.1f} users/s; wrote {args.output}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from e4srec.stages import report as stage

    stage.run_tracked(args.data, args.sasrec, args.e4srec, args.output, verdict_dir=args.verdict,
                      overwrite=args.overwrite, tracking=args.tracking, experiment=args.experiment)
    print(f"wrote {Path(args.output) / stage.PAGE}")
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from e4srec import backbones

    for name, description in backbones.registered().items():
        print(f"{name:<16} {description}")
    print(f"cache: {backbones.cache_dir()}  (set {backbones.CACHE_ENV} to move it)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from e4srec import contracts as c
    from e4srec.evaluate import evaluate
    from e4srec.outputs import preflight, staged_output
    from e4srec.stages import pretrain_sasrec
    from e4srec.storage import fetch

    if args.output:
        preflight(args.output, args.overwrite, {"--model": args.model, "--data": args.data})
    data = c.load_sequence_data(fetch(args.data))
    model = pretrain_sasrec.load_model(fetch(args.model), data)
    metrics: dict[str, float] = {}
    by_length = {}
    for split in c.SPLITS:
        result = evaluate(model.score_all_items, data, split, batch_size=args.batch_size)
        metrics |= result.metrics()
        by_length[split] = result.by_length()
    _print_metrics(metrics, Path(args.model).name)
    if args.output:
        with staged_output(args.output, args.overwrite) as out:
            c.write_json(out / c.METRICS, metrics)
            c.write_json(out / "metrics_by_length.json", by_length)
        print(f"wrote {args.output}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from e4srec.local import run_local

    params = {k: getattr(args, k) for k in args.pipeline_params}
    return run_local(input_path=args.input, instructions=args.instructions, pipeline_root=args.pipeline_root,
                     params=params, verbose=args.verbose)


def _auth_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Kubeflow")
    g.add_argument("--host", help="Kubeflow Pipelines API endpoint, e.g. https://kubeflow.example.com/pipeline")
    g.add_argument("--namespace", help="Kubeflow profile namespace (multi-user clusters)")
    g.add_argument("--experiment", dest="kfp_experiment", default="e4srec", help="KFP experiment name (default: e4srec)")
    g.add_argument("--run-name", help="KFP run name")
    auth = g.add_mutually_exclusive_group()
    auth.add_argument("--token", default=os.environ.get("KFP_TOKEN"), help="bearer token (default: $KFP_TOKEN)")
    auth.add_argument("--cookie", help="session cookie of an auth proxy, e.g. 'authservice_session=...'")


def cmd_submit(args: argparse.Namespace) -> int:
    from e4srec_pipelines.submit import submit

    args.host = args.host or os.environ.get("KF_PIPELINES_ENDPOINT")
    if not args.host:
        raise E4SRecError("submit needs --host (the Kubeflow Pipelines API URL) or KF_PIPELINES_ENDPOINT")
    arguments = {k: getattr(args, k) for k in args.pipeline_params}
    arguments["input_uri"] = args.input
    arguments["instructions_uri"] = args.instructions or ""
    result = submit(arguments, host=args.host, profile=args.profile, namespace=args.namespace,
                    experiment=args.kfp_experiment, run_name=args.run_name, token=args.token, cookie=args.cookie,
                    pipeline_root=args.pipeline_root, upload=args.upload, schedule=args.schedule)
    if result.version_id:
        print(f"uploaded pipeline {args.upload!r} version {result.version_name} ({result.pipeline_id} / "
              f"{result.version_id})")
    print(f"submitted {result.kind} {result.id} to {args.host} (experiment {args.kfp_experiment}, profile "
          f"{args.profile}, pipeline root {result.pipeline_root or 'the kfp-launcher ConfigMap default'}"
          + (f", schedule {args.schedule!r}" if args.schedule else "") + ")")
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    from e4srec_pipelines.submit import earlier_run, rerun_pipeline, submit

    overrides = dict(item.split("=", 1) for item in args.input_override)
    if args.profile is None:
        args.profile = "cluster" if args.host else "local"
    elif args.host and args.profile == "local":
        raise E4SRecError("rerun --host runs on Kubeflow, the local profile on this machine: drop --profile local "
                          "(the cluster profile is the default with --host) or pass your cluster profile YAML")
    run = earlier_run(args.from_run, host=args.host, token=args.token, cookie=args.cookie, namespace=args.namespace)
    pipeline = rerun_pipeline(args.stage, run, args.set, profile=args.profile, overrides=overrides)
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
    os.environ["E4SREC_PIPELINE_RUN_NAME"] = f"rerun-{args.stage}-of-{run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.environ["E4SREC_RERUN_OF"] = run.run_id or run.name
    return run_one_stage(pipeline, args.pipeline_root, verbose=args.verbose)


def cmd_runs(args: argparse.Namespace) -> int:
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


def cmd_compile(args: argparse.Namespace) -> int:
    from e4srec_pipelines import compile_pipeline

    path = compile_pipeline(args.output, profile=args.profile)
    print(f"wrote {path} (profile {args.profile})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `e4srec` argument parser (also used to document the CLI)."""
    from e4srec.stages.batch_recommend import BatchRecommendConfig
    from e4srec.stages.deploy import DeployConfig
    from e4srec.stages.instruction_tune import InstructionTuneConfig
    from e4srec.stages.prepare_data import PrepareDataConfig
    from e4srec.stages.pretrain_sasrec import PretrainSasrecConfig
    from e4srec.stages.train_e4srec import TrainE4SRecConfig

    fmt = _DefaultsFormatter
    parser = argparse.ArgumentParser(prog="e4srec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare-data", help="ingest, validate, split, sample negatives",
                       description="Read an S3-Rec text file or an interactions table and write "
                                   "sequences.parquet, item_map.parquet, negatives.parquet, manifest.json.")
    p.add_argument("--input", required=True, type=str, help="S3-Rec .txt file or interactions .parquet/.csv/.tsv")
    p.add_argument("--output", required=True, type=str, help="output folder")
    cfg.add_arguments(p, PrepareDataConfig)
    _tracking_args(p)
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("pretrain-sasrec", help="train SASRec, export item embeddings",
                       description="Train SASRec on a prepare-data output with early stopping on validation "
                                   "NDCG@10; write weights, item embeddings, item map and metrics.")
    p.add_argument("--data", required=True, type=str, help="prepare-data output folder")
    p.add_argument("--output", required=True, type=str, help="output folder")
    cfg.add_arguments(p, PretrainSasrecConfig)
    _tracking_args(p)
    p.set_defaults(func=cmd_pretrain_sasrec)

    p = sub.add_parser("instruction-tune", help="LoRA instruction tuning of the LLM backbone (or --skip)",
                       description="LoRA SFT on Alpaca-format data with the loss on response tokens; writes a "
                                   "PEFT adapter and backbone.json. --skip passes the base through.")
    p.add_argument("--instructions", type=str, help="Alpaca JSON, JSONL or Parquet (not needed with --skip)")
    p.add_argument("--output", required=True, type=str, help="output folder")
    cfg.add_arguments(p, InstructionTuneConfig)
    _tracking_args(p)
    p.set_defaults(func=cmd_instruction_tune)

    p = sub.add_parser("train-e4srec", help="train E4SRec and rank the whole catalog",
                       description="Frozen LLM + SASRec item embeddings through Linear(64 -> hidden), LoRA, and a "
                                   "Linear(hidden -> N+1) item head trained with cross-entropy over all items. "
                                   "Under torchrun it trains data-parallel.")
    p.add_argument("--data", required=True, type=str, help="prepare-data output folder")
    p.add_argument("--sasrec", required=True, type=str, help="pretrain-sasrec output folder")
    p.add_argument("--llm", required=True, help="instruction-tune output folder, or a backbone spec (smollm2-135m, "
                                                "tiny, gguf:PATH, hf:FOLDER_OR_ID)")
    p.add_argument("--output", required=True, type=str, help="output folder")
    cfg.add_arguments(p, TrainE4SRecConfig)
    _tracking_args(p)
    p.set_defaults(func=cmd_train_e4srec)

    p = sub.add_parser("extend-items", help="add new items to a trained E4SRec (LLM and LoRA untouched)",
                       description="Append items with their SASRec-space embeddings; their head rows are "
                                   "predicted by a ridge regression fitted on the trained items. Old items score "
                                   "exactly as before.")
    p.add_argument("--model", required=True, type=str, help="train-e4srec output folder")
    p.add_argument("--new-items", required=True, type=str, help="Parquet: item_id (string), embedding (list<float>)")
    p.add_argument("--output", required=True, type=str, help="output folder (a copy of the model, extended)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    p.set_defaults(func=cmd_extend_items)

    p = sub.add_parser("deploy", help="judge a run's E4SRec and SASRec against the champion; register both",
                       description="Score the run's E4SRec, its SASRec and the champion on the same test users; the "
                                   "better of the run's two (alias challenger) becomes champion only if it beats "
                                   "the champion (unless --no-apply). Both are registered as MLflow pyfuncs under "
                                   "one name; nothing is registered when a step fails.")
    p.add_argument("--model", required=True, type=str, help="train-e4srec output folder")
    p.add_argument("--sasrec", required=True, type=str, help="pretrain-sasrec output folder of the same run (the "
                                                              "baseline E4SRec must beat; registered too)")
    p.add_argument("--data", required=True, type=str, help="prepare-data output folder (the gate's test split)")
    p.add_argument("--output", required=True, type=str, help="output folder for verdict.json")
    cfg.add_arguments(p, DeployConfig)
    p.add_argument("--apply", action=argparse.BooleanOptionalAction, default=True,
                   help="move champion when the verdict says promote (default: on)")
    p.add_argument("--experiment", default="e4srec", help="MLflow experiment name (default: e4srec)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("promote", help="move the champion alias (or --rollback, or show --history)",
                       description="Move `champion` to a version or the current challenger; --rollback returns to "
                                   "the previous champion. Refuses a version with another item map unless --force.")
    p.add_argument("name", help="registered model name, e.g. e4srec-Beauty")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--version", help="version to promote (default: the current challenger)")
    g.add_argument("--rollback", action="store_true", help="back to the champion before the current one")
    g.add_argument("--history", action="store_true", help="print every recorded alias move and exit")
    p.add_argument("--force", action="store_true", help="promote even when the item maps differ")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("recommend", help="top-k items for a history of original item ids",
                       description="Score with a train-e4srec folder or a registered model "
                                   "(models:/NAME@champion); unknown ids are dropped and reported.")
    p.add_argument("--model", required=True, help="train-e4srec output folder, or models:/NAME@ALIAS")
    p.add_argument("--history", nargs="*", default=[], help="original item ids, oldest first")
    p.add_argument("--k", type=int, default=10, help="how many items (default: 10)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"),
                   help="backbone precision for a model folder (default: the one it was trained with)")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("batch-recommend", help="top-k original item ids for every user, as Parquet",
                       description="Score every user's whole sequence; write recommendations.parquet "
                                   "(user_id, items, scores).")
    p.add_argument("--model", required=True, type=str, help="train-e4srec or pretrain-sasrec output folder, or "
                                                             "models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--data", required=True, type=str, help="prepare-data output folder")
    p.add_argument("--output", required=True, type=str, help="output folder")
    cfg.add_arguments(p, BatchRecommendConfig)
    _tracking_args(p)
    p.set_defaults(func=cmd_batch_recommend)

    p = sub.add_parser("report", help="the run's HTML report",
                       description="Metrics side by side (with published numbers), curves, by-length groups, "
                                   "deploy verdict and alias history, as report.html with its PNGs.")
    p.add_argument("--data", required=True, type=str, help="prepare-data output folder")
    p.add_argument("--sasrec", required=True, type=str, help="pretrain-sasrec output folder")
    p.add_argument("--e4srec", required=True, type=str, help="train-e4srec output folder")
    p.add_argument("--verdict", type=str, help="deploy output folder (verdict.json)")
    p.add_argument("--output", required=True, type=str, help="output folder")
    _tracking_args(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("backbones", help="list the registered LLM backbone kinds",
                       description="Backbone specs: a registered name, or KIND:ARGUMENT for kinds that take one.")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("evaluate", help="evaluate a trained SASRec on a prepare-data output",
                       description="Full and sampled ranking on valid and test; checks the item-map hash.")
    p.add_argument("--model", required=True, type=str, help="pretrain-sasrec output folder")
    p.add_argument("--data", required=True, type=str, help="prepare-data output folder")
    p.add_argument("--output", type=str, help="write metrics.json and metrics_by_length.json here")
    p.add_argument("--batch-size", type=int, default=1024, help="users per scoring batch")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("run", help="run the whole pipeline locally (kfp.local)", formatter_class=fmt,
                       description="Run the pipeline on this machine through kfp.local's SubprocessRunner; "
                                   "MLflow runs go to MLFLOW_TRACKING_URI or sqlite:///mlflow.db here.")
    p.add_argument("--input", type=str, default=Path("data/Beauty.txt"), help="raw dataset")
    p.add_argument("--instructions", type=str, default=Path("data/instructions.json"),
                   help="Alpaca-format data for instruction-tune")
    p.add_argument("--pipeline-root", type=Path, default=Path("runs"), help="where task outputs land")
    p.add_argument("--verbose", action="store_true", help="show the tasks' whole output (KFP executor input, "
                                                          "library warnings, tracebacks)")
    from e4srec_pipelines import pipeline_parameters

    names = []
    for name, (tp, default, help_text) in pipeline_parameters().items():
        if name in ("input_uri", "instructions_uri"):
            continue
        flag = "--" + name.replace("_", "-")
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            p.add_argument(flag, type=tp, default=default, help=help_text)
        names.append(name)
    p.set_defaults(func=cmd_run, pipeline_params=names)
    run_parser = p

    p = sub.add_parser("submit", help="compile and start a run on Kubeflow Pipelines", formatter_class=fmt,
                       description="Compile the pipeline for a profile (default: cluster) and create a run through "
                                   "kfp.Client. Inputs are URIs the cluster can read (s3://...).")
    p.add_argument("--input", required=True, help="raw dataset URI, e.g. s3://bucket/raw/Beauty.txt")
    p.add_argument("--instructions", help="instruction data URI (for --instruction-tune-backbone)")
    p.add_argument("--profile", default="cluster", help="cluster, local, or a profile YAML")
    p.add_argument("--pipeline-root", help="where the run's artifacts go, e.g. s3://bucket/root (default: the "
                                           "profile's pipeline_root; empty: the kfp-launcher ConfigMap's default)")
    p.add_argument("--upload", metavar="NAME", help="upload the compiled pipeline as a new version of the named "
                                                    "pipeline (created when missing) and run that version")
    p.add_argument("--schedule", metavar="CRON", help="create a recurring run on this cron schedule (5 fields, or "
                                                      "KFP's 6 with seconds) instead of a single run")
    _auth_args(p)
    for name in names:
        action = run_parser._option_string_actions["--" + name.replace("_", "-")]
        if name == "experiment":  # --experiment is the KFP experiment here
            p.add_argument("--mlflow-experiment", dest="experiment", default=action.default, help=action.help)
        elif isinstance(action, argparse.BooleanOptionalAction):
            p.add_argument(action.option_strings[0], action=argparse.BooleanOptionalAction, default=action.default,
                           help=action.help)  # the action adds the --no- form itself
        else:
            p.add_argument(action.option_strings[0], type=action.type, default=action.default, help=action.help)
    p.set_defaults(func=cmd_submit, pipeline_params=names)

    p = sub.add_parser("rerun", help="rerun one stage on an earlier run's outputs",
                       description="Build a one-stage pipeline whose inputs are an earlier run's outputs, brought in "
                                   "with dsl.importer; run it here (kfp.local) or, with --host, on Kubeflow.")
    from e4srec_pipelines.submit import RERUN_INPUTS

    p.add_argument("stage", choices=list(RERUN_INPUTS), help="the stage to run again")
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
    _auth_args(p)
    p.set_defaults(func=cmd_rerun)

    p = sub.add_parser("runs", help="list the latest pipeline runs tracked in MLflow", formatter_class=fmt,
                       description="The pipeline runs of an MLflow experiment, newest first: when, status, users, "
                                   "SASRec and E4SRec test NDCG@10, the gate's verdict, reruns and the model "
                                   "versions each registered (with their aliases now).")
    p.add_argument("--experiment", default="e4srec", help="MLflow experiment name")
    p.add_argument("--limit", type=int, default=20, help="how many runs")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("compile", help="compile the pipeline to KFP IR YAML", formatter_class=fmt,
                       description="Write the Kubeflow Pipelines spec that `kfp` clients and the UI upload.")
    p.add_argument("--output", type=str, default="pipeline.yaml", help="YAML file to write")
    p.add_argument("--profile", default="cluster", help="local, cluster, or a profile YAML (images, pipeline root, "
                                                      "environment, secrets, GPUs, caching)")
    p.set_defaults(func=cmd_compile)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `e4srec` console script."""
    # MLflow's INFO lines (database creation and migration) would bury the one-line errors and the
    # metrics table; MLFLOW_LOGGING_LEVEL=INFO brings them back.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())  # also when already imported
    args = build_parser().parse_args(argv)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if on_main_thread else None
    try:
        return args.func(args)
    except E4SRecError as e:
        print(f"e4srec {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"e4srec {args.command}: interrupted; unfinished output removed", file=sys.stderr)
        return 130
    except Stopped:
        print(f"e4srec {args.command}: stopped by SIGTERM; unfinished output removed", file=sys.stderr)
        return 143
    except Exception as e:  # a tracking server's or an object store's error reaching the top: one line too
        service = type(e).__module__.split(".")[0]
        if service not in SERVICES:
            raise
        detail = " ".join(str(e).split())[:300]
        print(f"e4srec {args.command}: error: {SERVICES[service]} failed: {type(e).__name__}: {detail}; check the "
              f"server ({_service_address(service)}) and its credentials", file=sys.stderr)
        return 1
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


SERVICES = {"mlflow": "MLflow", "requests": "an HTTP request", "urllib3": "an HTTP request", "botocore": "S3",
            "boto3": "S3", "s3transfer": "S3"}


def _service_address(service: str) -> str:
    if SERVICES[service] == "S3":
        return f"AWS_ENDPOINT_URL={os.environ.get('AWS_ENDPOINT_URL', 'unset')}"
    return f"MLFLOW_TRACKING_URI={os.environ.get('MLFLOW_TRACKING_URI', 'sqlite:///mlflow.db')}"


class _DefaultsFormatter(argparse.HelpFormatter):
    """argparse's defaults formatter, without "(default: None)" and without saying a default twice."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, argparse.SUPPRESS, False) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _stop(signum: int, frame: object) -> None:
    raise Stopped()


if __name__ == "__main__":
    raise SystemExit(main())
