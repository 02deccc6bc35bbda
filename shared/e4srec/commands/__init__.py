"""The `e4srec` subcommands, as tables: stage commands, operations, pipeline commands.

Each module lists its commands as `Command` rows; `e4srec.cli` builds the parser from them. A
command's `run` imports what it needs when it runs, so building the parser (and `--help`) imports
neither torch nor kfp.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    help: str  # one line, in `e4srec --help`
    description: str  # `e4srec NAME --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    show_defaults: bool = False  # append "(default: ...)" to every flag's help


def add_tracking(p: argparse.ArgumentParser, *, switch: bool = True) -> None:
    """--tracking/--no-tracking (unless `switch` is off: the command always tracks), --experiment, --overwrite."""
    g = p.add_argument_group("tracking")
    if switch:
        g.add_argument("--tracking", action=argparse.BooleanOptionalAction, default=True,
                       help="log params, curves, metrics and artifacts to MLflow (MLFLOW_TRACKING_URI, "
                            "else sqlite:///mlflow.db here) (default: on)")
    g.add_argument("--experiment", default="e4srec", help="MLflow experiment name (default: e4srec)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")


def print_metrics(metrics: dict[str, float], title: str) -> None:
    from e4srec.evaluate import format_table

    print(format_table({title: metrics}))
