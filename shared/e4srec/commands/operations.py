"""Operations on trained models and the registry: promote, recommend, extend-items, evaluate, backbones."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from e4srec.commands import Command, print_metrics
from e4srec.errors import E4SRecError


def promote_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="registered model name, e.g. e4srec-Beauty")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--version", help="version to promote (default: the current challenger)")
    g.add_argument("--rollback", action="store_true", help="back to the champion before the current one")
    g.add_argument("--history", action="store_true", help="print every recorded alias move and exit")
    p.add_argument("--force", action="store_true", help="promote even when the item maps differ")


def promote(args: argparse.Namespace) -> int:
    from e4srec import registry

    if args.history:
        registry.check_exists(args.name)
        for move in registry.alias_history(args.name):
            print(registry.describe(move))
        return 0
    move = registry.promote(args.name, to_version=args.version, rollback=args.rollback, force=args.force)
    print(f"{args.name}: {registry.describe(move)}")
    return 0


def recommend_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="train-e4srec output folder, or models:/NAME@ALIAS")
    p.add_argument("--history", nargs="*", default=[], help="original item ids, oldest first")
    p.add_argument("--k", type=int, default=10, help="how many items (default: 10)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"),
                   help="backbone precision for a model folder (default: the one it was trained with)")


def recommend(args: argparse.Namespace) -> int:
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


def extend_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=str, help="train-e4srec output folder")
    p.add_argument("--new-items", required=True, type=str, help="Parquet: item_id (string), embedding (list<float>)")
    p.add_argument("--output", required=True, type=str, help="output folder (a copy of the model, extended)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")


def extend(args: argparse.Namespace) -> int:
    from e4srec.extend import extend_items

    summary = extend_items(args.model, args.new_items, args.output, overwrite=args.overwrite)
    print(f"added {summary['items_added']} items to {summary['items_before']}; item map "
          f"{summary['item_map_sha256'][:12]}; wrote {args.output}")
    return 0


def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=str, help="pretrain-sasrec output folder")
    p.add_argument("--data", required=True, type=str, help="prepare-data output folder")
    p.add_argument("--output", type=str, help="write metrics.json and metrics_by_length.json here")
    p.add_argument("--batch-size", type=int, default=1024, help="users per scoring batch")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")


def evaluate(args: argparse.Namespace) -> int:
    from e4srec import contracts as c
    from e4srec.evaluate import evaluate
    from e4srec.outputs import preflight, staged_output
    from e4srec.sasrec import load_model
    from e4srec.storage import fetch

    if args.output:
        preflight(args.output, args.overwrite, {"--model": args.model, "--data": args.data})
    data = c.load_sequence_data(fetch(args.data))
    model = load_model(fetch(args.model), data)
    metrics: dict[str, float] = {}
    by_length = {}
    for split in c.SPLITS:
        result = evaluate(model.score_all_items, data, split, batch_size=args.batch_size)
        metrics |= result.metrics()
        by_length[split] = result.by_length()
    print_metrics(metrics, Path(args.model).name)
    if args.output:
        with staged_output(args.output, args.overwrite) as out:
            c.write_json(out / c.METRICS, metrics)
            c.write_json(out / "metrics_by_length.json", by_length)
        print(f"wrote {args.output}")
    return 0


def backbones(args: argparse.Namespace) -> int:
    from e4srec import backbones

    for name, description in backbones.registered().items():
        print(f"{name:<16} {description}")
    print(f"cache: {backbones.cache_dir()}  (set {backbones.CACHE_ENV} to move it)")
    return 0


COMMANDS = (
    Command("extend-items", "add new items to a trained E4SRec (LLM and LoRA untouched)",
            "Append items with their SASRec-space embeddings; their head rows are predicted by a ridge regression "
            "fitted on the trained items. Old items score exactly as before.", extend_arguments, extend),
    Command("promote", "move the champion alias (or --rollback, or show --history)",
            "Move `champion` to a version or the current challenger; --rollback returns to the previous champion. "
            "Refuses a version with another item map unless --force.", promote_arguments, promote),
    Command("recommend", "top-k items for a history of original item ids",
            "Score with a train-e4srec folder or a registered model (models:/NAME@champion); unknown ids are dropped "
            "and reported.", recommend_arguments, recommend),
    Command("backbones", "list the registered LLM backbone kinds",
            "Backbone specs: a registered name, or KIND:ARGUMENT for kinds that take one.", lambda p: None, backbones),
    Command("evaluate", "evaluate a trained SASRec on a prepare-data output",
            "Full and sampled ranking on valid and test; checks the item-map hash.", evaluate_arguments, evaluate),
)
