"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

The tracking URI is MLflow's own: `MLFLOW_TRACKING_URI` when set, else `sqlite:///mlflow.db` in the
working directory. Stages of one pipeline run find their parent by the tag `e4srec.pipeline_run_id`
(the KFP run id), creating it on first use, so any stage can run first, alone, or again. A stage run
outside a pipeline gets a top-level run of its own.

The run id reaches a stage in the environment, `E4SREC_PIPELINE_RUN_ID`, never as a task input: on
Kubeflow from the pod's `pipeline/runid` label (kfp-kubernetes `use_field_path_as_env`), locally from
`e4srec run`. An input would enter KFP's cache fingerprint and no task would ever hit the cache.
The parent run is named after the run when a stage knows its name: the uncached stages deploy and
report get it as an input (`{{$.pipeline_job_name}}`) and name the parent then; until then it is
`pipeline-<run id>`.

MLflow forbids '@' in metric names, so `test/full/HR@10` is logged as `test/full/HR_at_10`;
metrics.json keeps the '@'.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

PIPELINE_RUN_TAG = "e4srec.pipeline_run_id"
RERUN_TAG = "e4srec.rerun_of"  # on a rerun's parent run: the pipeline run id whose outputs it reran on
STAGE_TAG = "e4srec.stage"
DEFAULT_EXPERIMENT = "e4srec"
T = TypeVar("T")


def mlflow_key(name: str) -> str:
    """A metric or param name MLflow accepts ('@' becomes '_at_')."""
    return name.replace("@", "_at_")


class Tracker:
    """Logging calls a stage makes; a disabled tracker accepts and drops them all.

    Tracking never costs a stage its work: when the tracking server stops answering (after MLflow's own
    retries), the tracker says so once on stderr and drops every later call; the stage's outputs are
    written as usual and the MLflow run is left as the server last saw it.
    """

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id
        self.lost: str | None = None  # why tracking stopped, once it has

    @property
    def enabled(self) -> bool:
        return self.run_id is not None and self.lost is None

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if not self.enabled:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (MlflowException, requests' and the artifact store's errors)
            self.lost = " ".join(str(e).split())[:200]
            print(f"warning: MLflow tracking stopped at {what} ({self.lost}); the stage goes on and writes its "
                  f"outputs, but its MLflow run ends here", file=sys.stderr, flush=True)

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
        self._call("log_params", mlflow.log_params, flat)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics (non-finite values are skipped: MLflow cannot chart them)."""
        if not self.enabled:
            return
        import math

        import mlflow

        clean = {mlflow_key(k): float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if clean:
            self._call("log_metrics", mlflow.log_metrics, clean, step=step)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        """Upload a folder's files as run artifacts."""
        if self.enabled:
            import mlflow

            self._call("log_artifacts", mlflow.log_artifacts, str(folder), artifact_path)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload one file as a run artifact."""
        if self.enabled:
            import mlflow

            self._call("log_artifact", mlflow.log_artifact, str(path), artifact_path)


def _beside_database(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: `mlruns/<experiment>/` beside a SQLite database file
    (MLflow's own default is `./mlruns/<id>` of whatever folder the process happens to run in, so runs
    started from two folders would scatter); the server's choice for any other store."""
    from urllib.parse import quote, urlparse

    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite" or not parsed.path.startswith("/") or parsed.path in ("/", "/:memory:"):
        return None
    return (Path(parsed.path[1:]).resolve().parent / "mlruns" / quote(experiment, safe="")).as_uri()


def _experiment_id(client: Any, name: str) -> str:
    """The experiment's id, created when missing. Two stages may create it at the same moment (on a
    cluster prepare-data and instruction-tune start together): the name is unique in MLflow's store,
    so the loser gets RESOURCE_ALREADY_EXISTS and reads the winner's."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_beside_database(client.tracking_uri, name))
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _parents(client: Any, experiment_id: str, pipeline_run_id: str) -> list[Any]:
    return client.search_runs([experiment_id], filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'",
                              max_results=100)


def _settle_parent(client: Any, experiment_id: str, pipeline_run_id: str, pipeline_run_name: str,
                   created: str | None = None) -> tuple[str, str | None]:
    """(the pipeline run's parent run, the parent this stage created if it did).

    MLflow has no unique key for a run, so two stages starting together can both create a parent. The
    parent with the smallest run id is the pipeline's; a stage joins it. A stage deletes only a parent it
    created itself, at its own end (`created` given), after moving that parent's children (nesting is the
    `mlflow.parentRunId` tag) to the winner; no stage deletes a parent another may be starting under.
    """
    found = _parents(client, experiment_id, pipeline_run_id)
    if not found:
        if created is None:
            tags = {PIPELINE_RUN_TAG: pipeline_run_id, "kfp.run_name": pipeline_run_name}
            if os.environ.get("E4SREC_RERUN_OF"):
                tags[RERUN_TAG] = os.environ["E4SREC_RERUN_OF"]
            created = client.create_run(experiment_id, run_name=pipeline_run_name or f"pipeline-{pipeline_run_id}",
                                        tags=tags).info.run_id
        found = _parents(client, experiment_id, pipeline_run_id) or [client.get_run(created)]
    winner = min(found, key=lambda r: r.info.run_id)
    if pipeline_run_name and not winner.data.tags.get("kfp.run_name"):  # made by a stage that had no name
        client.update_run(winner.info.run_id, name=pipeline_run_name)
        client.set_tag(winner.info.run_id, "kfp.run_name", pipeline_run_name)
    return winner.info.run_id, created


def _retire(client: Any, experiment_id: str, loser: str, winner: str) -> None:
    """Move a losing parent's children to the winner, then delete it."""
    children = client.search_runs([experiment_id], max_results=1000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{loser}'")
    for child in children:
        client.set_tag(child.info.run_id, "mlflow.parentRunId", winner)
    client.delete_run(loser)


# The oldest MLflow server the stages work with: they are MLflow 3 clients, and MLflow 3's log_model
# records a LoggedModel through /api/2.0/mlflow/logged-models, which 2.x servers do not have.
MIN_MLFLOW_SERVER = (3, 0)


def _server_version(uri: str, timeout: float) -> str:
    """What the server's /version answers ('' when it does not say)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/version", timeout=timeout) as response:
            return response.read().decode().strip()
    except (urllib.error.URLError, OSError, UnicodeDecodeError):
        return ""


def check_server(attempts: int = 3, timeout: float = 5.0) -> None:
    """For an http(s) tracking URI, fail in seconds (not after MLflow's minutes of retries) when the
    server does not answer its /health endpoint, or is older than MIN_MLFLOW_SERVER."""
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
                    _check_version(uri, _server_version(uri, timeout))
                    return
                reason = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as e:
            reason = str(getattr(e, "reason", e))
        if attempt + 1 < attempts:
            time.sleep(min(2**attempt, 4))
    raise E4SRecError(f"MLflow server {uri} is not answering ({reason}) after {attempts} tries; start it, fix "
                      f"MLFLOW_TRACKING_URI, or run with --no-tracking")


def _check_version(uri: str, text: str) -> None:
    import re

    from e4srec.errors import E4SRecError

    m = re.match(r"(\d+)\.(\d+)", text)
    if m and (int(m.group(1)), int(m.group(2))) < MIN_MLFLOW_SERVER:
        raise E4SRecError(f"MLflow server {uri} is version {text}; the stages need "
                          f"{'.'.join(map(str, MIN_MLFLOW_SERVER))} or later (MLflow 3 clients log models through "
                          f"its logged-models API); upgrade the server")


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
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    pipeline_run_id = pipeline_run_id or os.environ.get("E4SREC_PIPELINE_RUN_ID", "")
    pipeline_run_name = pipeline_run_name or os.environ.get("E4SREC_PIPELINE_RUN_NAME", "")
    client = MlflowClient()
    experiment_id = _experiment_id(client, experiment)
    parent = created = None
    for attempt in range(3):  # a parent can vanish between settling and starting under it (its creator retired it)
        try:
            if pipeline_run_id:
                parent, created = _settle_parent(client, experiment_id, pipeline_run_id, pipeline_run_name, created)
                client.update_run(parent, status="RUNNING")
            run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent,
                                   tags={STAGE_TAG: stage})
            break
        except MlflowException:
            if attempt == 2 or not pipeline_run_id:
                raise
    status = "FAILED"
    tracker = Tracker(run.info.run_id)
    try:
        yield tracker
        status = "FINISHED"
    finally:
        if tracker.lost is not None:  # the server went away mid-stage: one try to close the run, no retries
            saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            with contextlib.suppress(Exception):
                mlflow.end_run(status)
            if saved is None:
                os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
            else:
                os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved
        else:
            mlflow.end_run(status)
            if parent:  # settle again: a stage that started at the same moment may have made a parent too
                parent, _ = _settle_parent(client, experiment_id, pipeline_run_id, pipeline_run_name, created)
                if created and created != parent:
                    _retire(client, experiment_id, created, parent)
                client.set_tag(run.info.run_id, "mlflow.parentRunId", parent)
                if status == "FINISHED":
                    _summarise_on_parent(client, run.info.run_id, parent, stage)
                client.set_terminated(parent, status)


def tracked(stage: str, check: Callable[..., None], *, rank_zero_only: bool = False
            ) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Make a stage's `run_tracked` from its `run(*args, overwrite=..., tracker=..., **kwargs)`.

    `run_tracked(*args, tracking=True, experiment=..., pipeline_run_id="", pipeline_run_name="", **kwargs)`
    calls `check(*args, overwrite=...)` first (a refused output then leaves no FAILED run behind), then
    `run` inside the stage's MLflow run, nested under the pipeline run when there is one. With
    `rank_zero_only` (a stage that runs under torchrun) only rank 0 tracks.
    """

    def wrap(run: Callable[..., T]) -> Callable[..., T]:
        def run_tracked(*args: Any, tracking: bool = True, experiment: str = DEFAULT_EXPERIMENT,
                        pipeline_run_id: str = "", pipeline_run_name: str = "", **kwargs: Any) -> T:
            check(*args, overwrite=kwargs.get("overwrite", False))
            enabled = tracking and not (rank_zero_only and int(os.environ.get("RANK", "0")) != 0)
            with stage_run(stage, enabled=enabled, experiment=experiment, pipeline_run_id=pipeline_run_id,
                           pipeline_run_name=pipeline_run_name) as tracker:
                return run(*args, tracker=tracker, **kwargs)

        run_tracked.__doc__ = f"`run` inside the {stage} stage's MLflow run (see e4srec.tracking.tracked)."
        return run_tracked

    return wrap


# A stage's metrics that the pipeline run's parent carries too, as STAGE/KEY, so that MLflow's runs
# table (and `e4srec runs`) compares pipeline runs without opening them.
PARENT_METRICS = ("test/full/HR_at_10", "test/full/NDCG_at_10", "valid/full/NDCG_at_10", "data/users", "data/items",
                  "train/examples", "deploy/promote")


def _summarise_on_parent(client: Any, run_id: str, parent: str, stage: str) -> None:
    import time

    from mlflow.entities import Metric

    metrics = client.get_run(run_id).data.metrics
    now = int(time.time() * 1000)
    picked = [Metric(f"{stage}/{k}", float(metrics[k]), now, 0) for k in PARENT_METRICS if k in metrics]
    if picked:
        client.log_batch(parent, metrics=picked)


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


def pipeline_runs(experiment: str = DEFAULT_EXPERIMENT, limit: int = 20) -> list[dict[str, Any]]:
    """The latest pipeline runs of an experiment (their parent runs), newest first: name, start, status,
    the metrics the stages summarised on them, what they reran, and the model versions they registered
    (with the aliases those carry now)."""
    import time

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    parents = client.search_runs([found.experiment_id], filter_string=f"tags.`{PIPELINE_RUN_TAG}` != ''",
                                 order_by=["attributes.start_time DESC"], max_results=limit)
    versions: dict[str, list[str]] = {}
    aliases_of: dict[tuple[str, str], list[str]] = {}  # search results carry no aliases: the models do
    for model in client.search_registered_models(max_results=1000):
        for alias, version in (model.aliases or {}).items():
            aliases_of.setdefault((model.name, str(version)), []).append(alias)
    for mv in client.search_model_versions(max_results=10000):
        run_id = (mv.tags or {}).get("pipeline_run_id")
        if run_id:
            found_aliases = sorted(aliases_of.get((mv.name, str(mv.version)), []))
            aliases = f" ({', '.join(found_aliases)})" if found_aliases else ""
            versions.setdefault(run_id, []).append(f"{mv.name} v{mv.version} {mv.tags.get('kind', '?')}{aliases}")
    rows = []
    for r in parents:
        tags = r.data.tags
        rows.append({"name": r.info.run_name, "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(
            r.info.start_time / 1000)), "status": r.info.status, "metrics": dict(r.data.metrics),
            "rerun_of": tags.get(RERUN_TAG, ""), "registered": versions.get(tags.get(PIPELINE_RUN_TAG, ""), [])})
    return rows
