"""`e4srec`: the pipeline's stages, operations on models and the registry, and the pipeline itself.

A command per stage, the operations (promote, recommend, extend-items, evaluate, backbones) and the
pipeline commands (run, submit, rerun, runs, compile); the commands are tables in e4srec.commands.

Stage commands share one convention: inputs as named options, `--output DIR`, `metrics.json`
written into the output (report writes its page instead), MLflow tracking on unless `--no-tracking`
(deploy always tracks: it registers). Building the parser imports neither torch nor kfp.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from e4srec.errors import E4SRecError, Stopped


def build_parser() -> argparse.ArgumentParser:
    """The `e4srec` argument parser (also used to document the CLI)."""
    from e4srec.commands import operations, pipeline, stages

    parser = argparse.ArgumentParser(prog="e4srec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in stages.COMMANDS + operations.COMMANDS + pipeline.COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description,
                           formatter_class=_DefaultsFormatter if command.show_defaults else argparse.HelpFormatter)
        command.add_arguments(p)
        p.set_defaults(func=command.run)
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
