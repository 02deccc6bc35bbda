"""Progress bars that also read well in KFP and CI logs.

On a terminal this is tqdm. Elsewhere (a KFP pod, kfp.local's log stream, CI) a bar redrawn with
carriage returns turns into one endless line, so the same bar is written as a plain log line at most
every 15 seconds.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


class _LineWriter(io.TextIOBase):
    """A file for tqdm that turns each redraw into one newline-terminated line on stderr."""

    def write(self, s: str) -> int:
        text = s.replace("\r", "").strip()
        if text:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        return len(s)


def progress(iterable: Iterable[T], *, desc: str, unit: str = "it", disable: bool = False, **kwargs: Any) -> Any:
    """tqdm on a terminal; timed log lines elsewhere."""
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, unit=unit, disable=disable, **kwargs)
    # tqdm's monitor thread redraws stalled bars with a stale count; log lines need no redraws.
    tqdm.monitor_interval = 0
    kwargs["mininterval"] = max(kwargs.get("mininterval", 0), 15)
    kwargs["leave"] = True
    return tqdm(iterable, desc=desc, unit=unit, disable=disable, file=_LineWriter(), ascii=True, **kwargs)
