"""What `e4srec run` shows of its tasks' output: by default the stage's own lines, without KFP's
executor dumps, library warnings and tracebacks of a stage's one-line errors (`--verbose`: all of it).

kfp.local streams each task subprocess's output through `subprocess_task_handler.run_local_subprocess`
(kfp 2.17.3); `quiet_task_output` puts a filtering copy of it in place for the length of a run.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

# The task-side environment of a quiet run: no deprecation chatter, no weight-loading bars.
QUIET_ENV = {"PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning", "TRANSFORMERS_VERBOSITY": "error",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
STAGE_ERROR = re.compile(r"^(?:e4srec\.errors\.)?E4SRecError: (.*)$")


class TaskOutput:
    """Filters one run's task output lines and remembers the last stage error line."""

    def __init__(self) -> None:
        self.last_error: str | None = None

    def filter(self, lines: Iterable[str]) -> Iterator[str]:
        """Drop KFP executor INFO lines with their JSON, keep everything else; a traceback whose
        exception is a stage's one-line error (E4SRecError) becomes that line alone, any other
        traceback (a bug) is kept whole."""
        in_executor_dump = False
        traceback: list[str] | None = None
        for line in lines:
            bare = line.rstrip("\n")
            if traceback is not None:
                traceback.append(line)
                if bare and not bare.startswith((" ", "\t")) and not bare.startswith("Traceback"):
                    m = STAGE_ERROR.match(bare)
                    if m:
                        self.last_error = m.group(1)
                        yield f"error: {m.group(1)}\n"
                    else:
                        yield from traceback
                    traceback = None
                continue
            if bare.startswith("[KFP Executor"):
                in_executor_dump = " INFO]: " in bare
                if in_executor_dump:
                    continue
            elif in_executor_dump and (bare.startswith((" ", "{", "}", "]")) or not bare):
                continue
            in_executor_dump = False
            if bare.startswith("Traceback (most recent call last):"):
                traceback = [line]
                continue
            yield line
        if traceback:
            yield from traceback


@contextmanager
def quiet_task_output(verbose: bool = False) -> Iterator[TaskOutput]:
    """While the block runs, kfp.local's task subprocesses print through `TaskOutput.filter` (and
    with QUIET_ENV), unless `verbose`."""
    output = TaskOutput()
    if verbose:
        yield output
        return
    from kfp.local import subprocess_task_handler as handler

    original = handler.run_local_subprocess

    def run_filtered(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        env = {**os.environ, **QUIET_ENV, **(env_vars or {})}
        with subprocess.Popen(full_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                              env=env) as process:
            if process.stdout:
                for line in output.filter(iter(process.stdout.readline, "")):
                    print(line, end="")
                print()
            return process.wait()

    handler.run_local_subprocess = run_filtered
    try:
        yield output
    finally:
        handler.run_local_subprocess = original
