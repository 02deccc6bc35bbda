"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

The tracking URI is MLflow's own: `MLFLOW_TRACKING_URI` when set, else `sqlite:///mlflow.db` in the
working directory. Stages of one pipeline run find their parent by the tag `e4srec.pipeline_run_id`
(the KFP run id), creating it on first use, so any stage can run first, alone, or again. A stage run
outside a pipeline gets a top-level run of its own.

MLflow forbids '@' in metric names, so `test/full/HR@10` is logged as `test/full/HR_at_10`;
metrics.json keeps the '@'.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PIPELINE_RUN_TAG = "e4srec.pipeline_run_id"
STAGE_TAG = "e4srec.stage"
DEFAULT_EXPERIMENT = "e4srec"


def mlflow_key(name: str) -> str:
    """A metric or param name MLflow accepts ('@' becomes '_at_')."""
    return name.replace("@", "_at_")


class Tracker:
    """Logging calls a stage makes; a disabled tracker accepts and drops them all."""

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def log_params(self, params: dict[str, Any], prefix: str = "") -> None:
        """Log flat params (nested dicts flattened with '.')."""
        if not self.enabled:
            return
        import mlflow

        flat: dict[str, Any] = {}

        def walk(d: dict[str, Any], p: str) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, f"{p}{k}.")
                else:
                    flat[mlflow_key(f"{p}{k}")] = str(v)[:6000]

        walk(params, prefix)
        mlflow.log_params(flat)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics (non-finite values are skipped: MLflow cannot chart them)."""
        if not self.enabled:
            return
        import math

        import mlflow

        clean = {mlflow_key(k): float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        """Upload a folder's files as run artifacts."""
        if self.enabled:
            import mlflow

            mlflow.log_artifacts(str(folder), artifact_path)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload one file as a run artifact."""
        if self.enabled:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags."""
        if self.enabled:
            import mlflow

            mlflow.set_tags(tags)


def _parent_run(client: Any, experiment_id: str, pipeline_run_id: str, pipeline_run_name: str) -> str:
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'", max_results=1
    )
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=pipeline_run_name or f"pipeline-{pipeline_run_id}",
        tags={PIPELINE_RUN_TAG: pipeline_run_id, "kfp.run_name": pipeline_run_name},
    )
    return run.info.run_id


def check_server(attempts: int = 3, timeout: float = 5.0) -> None:
    """For an http(s) tracking URI, fail in seconds (not after MLflow's minutes of retries) when the
    server does not answer its /health endpoint."""
    import os
    import time
    import urllib.error
    import urllib.request

    from e4srec.errors import E4SRecError

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return
    reason = ""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                if response.status == 200:
                    return
                reason = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as e:
            reason = str(getattr(e, "reason", e))
        if attempt + 1 < attempts:
            time.sleep(min(2**attempt, 4))
    raise E4SRecError(f"MLflow server {uri} is not answering ({reason}) after {attempts} tries; start it, fix "
                      f"MLFLOW_TRACKING_URI, or run with --no-tracking")


@contextmanager
def stage_run(
    stage: str,
    *,
    enabled: bool = True,
    experiment: str = DEFAULT_EXPERIMENT,
    pipeline_run_id: str = "",
    pipeline_run_name: str = "",
) -> Iterator[Tracker]:
    """Open the stage's MLflow run (nested under the pipeline's parent run when given one).

    The run ends FINISHED, or FAILED when the block raises; the parent run takes the same status, so
    in the UI the pipeline run reads as failed or finished after its latest stage.
    """
    if not enabled:
        yield Tracker(None)
        return
    check_server()
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    experiment_id = exp.experiment_id if exp else client.create_experiment(experiment)
    parent = _parent_run(client, experiment_id, pipeline_run_id, pipeline_run_name) if pipeline_run_id else None
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=stage, parent_run_id=parent, tags={STAGE_TAG: stage}
    ) as run:
        status = "FAILED"
        try:
            yield Tracker(run.info.run_id)
            status = "FINISHED"
        finally:
            mlflow.end_run(status)
            if parent:
                client.set_terminated(parent, status)


def figure_to_artifact(tracker: Tracker, fig: Any, name: str, out_dir: Path | None = None) -> None:
    """Save a matplotlib figure as PNG into `out_dir` (when given) and log it to the run."""
    import matplotlib.pyplot as plt

    if out_dir is not None:
        fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
    if tracker.enabled:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            fig.savefig(path, dpi=110, bbox_inches="tight")
            tracker.log_artifact(path, "plots")
    plt.close(fig)
