"""The stage commands: one row per stage, and one function that runs any of them.

`e4srec STAGE --INPUT ... --output DIR [settings]` builds the stage's config from its flags (the
fields of its e4srec.settings dataclass), calls the stage's `run_tracked` and prints what it wrote.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e4srec import config as cfg
from e4srec.commands import Command, add_tracking, print_metrics


@dataclass(frozen=True)
class Input:
    flag: str
    help: str
    required: bool = True
    keyword: str = ""  # passed to run_tracked as this keyword, not by position
    aliases: tuple[str, ...] = ()  # older spellings of the flag, still accepted


@dataclass(frozen=True)
class Stage:
    name: str  # the stage and its command: e4srec.stages.<name with underscores>, e4srec.settings.STAGES[name]
    help: str
    description: str
    inputs: tuple[Input, ...]
    show: Callable[[dict[str, float], argparse.Namespace], list[str]]  # what to print after the run
    tracking_switch: bool = True  # False: always tracks (deploy registers models), no --no-tracking
    output: str = "output folder"  # --output's help
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # more flags: {flag: add_argument keywords}


def _json(metrics: dict[str, float], args: argparse.Namespace) -> list[str]:
    return [json.dumps(metrics, indent=1), f"wrote {args.output}"]


def _table(title: str) -> Callable[[dict[str, float], argparse.Namespace], list[str]]:
    def show(metrics: dict[str, float], args: argparse.Namespace) -> list[str]:
        if not metrics:  # a torchrun process other than rank 0
            return []
        print_metrics(metrics, title)
        return [f"wrote {args.output}"]

    return show


def _deploy(metrics: dict[str, float], args: argparse.Namespace) -> list[str]:
    from e4srec import registry
    from e4srec.stages import deploy

    verdict = deploy.read_verdict(args.output)
    lines = deploy.summary(verdict)
    if verdict["promote"] and args.apply:
        lines += [f"champion -> version {verdict['challenger_version']}; serve it with:",
                  f"  {registry.serve_command(verdict['registered_model'])}"]
    return lines


def _batch(metrics: dict[str, float], args: argparse.Namespace) -> list[str]:
    return [f"{int(metrics['batch/users']):,} users, {metrics['batch/users_per_second']:.1f} users/s; "
            f"wrote {args.output}"]


def _report(metrics: dict[str, float], args: argparse.Namespace) -> list[str]:
    from e4srec.stages.report import PAGE

    return [f"wrote {Path(args.output) / PAGE}"]


DATA = Input("--data", "prepare-data output folder")
STAGES = (
    Stage("prepare-data", "ingest, validate, split, sample negatives",
          "Read an S3-Rec text file or an interactions table and write sequences.parquet, item_map.parquet, "
          "negatives.parquet, manifest.json.",
          (Input("--input", "S3-Rec .txt file or interactions .parquet/.csv/.tsv"),), _json),
    Stage("pretrain-sasrec", "train SASRec, export item embeddings",
          "Train SASRec on a prepare-data output with early stopping on validation NDCG@10; write weights, item "
          "embeddings, item map and metrics.", (DATA,), _table("SASRec")),
    Stage("instruction-tune", "LoRA instruction tuning of the LLM backbone (or --skip)",
          "LoRA SFT on Alpaca-format data with the loss on response tokens; writes a PEFT adapter and "
          "backbone.json. --skip passes the base through.",
          (Input("--instructions", "Alpaca JSON, JSONL or Parquet (not needed with --skip)", required=False),),
          _json),
    Stage("train-e4srec", "train E4SRec and rank the whole catalog",
          "Frozen LLM + SASRec item embeddings through Linear(64 -> hidden), LoRA, and a Linear(hidden -> N+1) "
          "item head trained with cross-entropy over all items. Under torchrun it trains data-parallel.",
          (DATA, Input("--sasrec", "pretrain-sasrec output folder"),
           Input("--backbone", "instruction-tune output folder, or a backbone spec (smollm2-135m, tiny, "
                               "gguf:PATH, hf:FOLDER_OR_ID)", aliases=("--llm",))), _table("E4SRec")),
    Stage("deploy", "judge a run's E4SRec and SASRec against the champion; register both",
          "Score the run's E4SRec, its SASRec and the champion on the same test users; the better of the run's two "
          "(alias challenger) becomes champion only if it beats the champion (unless --no-apply). Both are "
          "registered as MLflow pyfuncs under one name; nothing is registered when a step fails.",
          (Input("--model", "train-e4srec output folder"),
           Input("--sasrec", "pretrain-sasrec output folder of the same run (the baseline E4SRec must beat; "
                             "registered too)"),
           Input("--data", "prepare-data output folder (the gate's test split)")), _deploy, tracking_switch=False,
          output="output folder for verdict.json",
          extra={"--apply": dict(action=argparse.BooleanOptionalAction, default=True,
                                 help="move champion when the verdict says promote (default: on)")}),
    Stage("batch-recommend", "top-k original item ids for every user, as Parquet",
          "Score every user's whole sequence; write recommendations.parquet (user_id, items, scores).",
          (Input("--model", "train-e4srec or pretrain-sasrec output folder, or models:/NAME@ALIAS or "
                            "models:/NAME/VERSION"), DATA), _batch),
    Stage("report", "the run's HTML report",
          "Metrics side by side (with published numbers), curves, by-length groups, deploy verdict and alias "
          "history, as report.html with its PNGs.",
          (DATA, Input("--sasrec", "pretrain-sasrec output folder"), Input("--e4srec", "train-e4srec output folder"),
           Input("--verdict", "deploy output folder (verdict.json)", required=False, keyword="verdict_dir")),
          _report),
)


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _add_arguments(stage: Stage) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        from e4srec.settings import STAGES as CONFIGS

        for i in stage.inputs:
            p.add_argument(i.flag, *i.aliases, required=i.required, type=str, help=i.help)
        p.add_argument("--output", required=True, type=str, help=stage.output)
        if stage.name in CONFIGS:
            cfg.add_arguments(p, CONFIGS[stage.name])
        for flag, kwargs in stage.extra.items():
            p.add_argument(flag, **kwargs)
        add_tracking(p, switch=stage.tracking_switch)

    return add


def _runner(stage: Stage) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from e4srec.settings import STAGES as CONFIGS

        module = importlib.import_module("e4srec.stages." + stage.name.replace("-", "_"))
        config = [cfg.from_namespace(CONFIGS[stage.name], args)] if stage.name in CONFIGS else []
        positional = [getattr(args, _dest(i.flag)) for i in stage.inputs if not i.keyword]
        keywords = {i.keyword: getattr(args, _dest(i.flag)) for i in stage.inputs if i.keyword}
        keywords |= {_dest(flag): getattr(args, _dest(flag)) for flag in stage.extra}
        metrics = module.run_tracked(*config, *positional, args.output, overwrite=args.overwrite,
                                     tracking=getattr(args, "tracking", True), experiment=args.experiment, **keywords)
        for line in stage.show(metrics, args):
            print(line)
        return 0

    return run


COMMANDS = tuple(Command(s.name, s.help, s.description, _add_arguments(s), _runner(s)) for s in STAGES)
