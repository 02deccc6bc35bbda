"""Helpers the component shims share for KFP output artifacts (duck-typed: no kfp import here)."""

from __future__ import annotations

import json
from typing import Any


def write_metrics(artifact: Any, values: dict[str, float]) -> None:
    """Log each value on a KFP `Output[Metrics]` and also write them to its file.

    KFP keeps logged metrics in the artifact's metadata only; without a file at `artifact.path` the
    local cache never finds the output again and reruns the task and everything after it.
    """
    for name, value in values.items():
        artifact.log_metric(name, value)
    with open(artifact.path, "w") as f:
        json.dump(values, f, indent=1, sort_keys=True)
