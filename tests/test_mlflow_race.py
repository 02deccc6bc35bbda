"""Two stages of one pipeline run starting at the same moment, as prepare-data and instruction-tune do
on a cluster, against MLflow as teams run it in production: `mlflow server` with PostgreSQL as its
backend store (a fresh database) and SeaweedFS for artifacts."""

from __future__ import annotations

import multiprocessing
import subprocess
import uuid

import pytest
from helpers import mlflow_server
from s3server import BUCKET

PG = ["-h", "127.0.0.1", "-p", "5432", "-U", "postgres"]  # trust auth on the machines and in CI
ROUNDS = 8


def _postgres_up() -> bool:
    try:
        return subprocess.run(["psql", *PG, "-Atc", "select 1"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def postgres_mlflow(s3, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN001, ANN201
    if not _postgres_up():
        pytest.fail("PostgreSQL is not answering on 127.0.0.1:5432; it runs on every machine and in CI")
    db = f"e4srec_race_{uuid.uuid4().hex[:12]}"
    subprocess.run(["createdb", *PG, db], check=True)
    try:
        with mlflow_server(f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}", f"s3://{BUCKET}/mlflow-race",
                           s3.env(), tmp_path_factory.mktemp("mlflow-postgres"), workers=2) as url:
            yield url
    finally:
        subprocess.run(["dropdb", *PG, "--if-exists", db], check=False)


def _stage(stage: str, experiment: str, run_id: str, barrier, errors, both_searched=None) -> None:  # noqa: ANN001
    import time

    from e4srec import tracking
    from e4srec.tracking import stage_run

    if both_searched is not None:  # force the worst interleaving: both look for a parent before either makes one
        search, calls = tracking._parents, []

        def first_search_waits(*args):  # noqa: ANN002, ANN202
            found = search(*args)
            calls.append(1)
            if len(calls) == 1:
                both_searched.wait(timeout=60)
            return found

        tracking._parents = first_search_waits
    try:
        barrier.wait(timeout=60)
        with stage_run(stage, experiment=experiment, pipeline_run_id=run_id) as tracker:
            tracker.log_metrics({"x": 1.0})
            time.sleep(0.5)
    except Exception as e:  # noqa: BLE001 (reported to the test)
        errors.put(f"{stage}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")


@pytest.mark.timeout(600)
def test_two_stages_starting_together_share_one_experiment_and_one_parent_run(postgres_mlflow: str,
                                                                              monkeypatch) -> None:  # noqa: ANN001
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres_mlflow)
    import mlflow  # noqa: F401 (imported before the fork, so both children start at once)

    client = MlflowClient(tracking_uri=postgres_mlflow)
    ctx = multiprocessing.get_context("fork")
    problems = []
    for round_ in range(ROUNDS):
        experiment, run_id = f"race-{round_}-{uuid.uuid4().hex[:6]}", str(uuid.uuid4())
        barrier, errors = ctx.Barrier(2), ctx.Queue()
        forced = ctx.Barrier(2) if round_ % 2 else None  # odd rounds: two parents are certain to be made
        procs = [ctx.Process(target=_stage, args=(s, experiment, run_id, barrier, errors, forced))
                 for s in ("prepare-data", "instruction-tune")]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
            if p.exitcode != 0:
                problems.append(f"round {round_}: a stage process ended with {p.exitcode} (None: hung)")
                p.kill()
        while not errors.empty():
            problems.append(f"round {round_}: {errors.get()}")
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            problems.append(f"round {round_}: no experiment")
            continue
        runs = client.search_runs([exp.experiment_id])
        parents = [r for r in runs if r.data.tags.get("e4srec.pipeline_run_id") == run_id]
        children = [r for r in runs if "e4srec.stage" in r.data.tags]
        if len(parents) != 1:
            problems.append(f"round {round_}: {len(parents)} parent runs")
        elif {c.data.tags.get("mlflow.parentRunId") for c in children} != {parents[0].info.run_id}:
            problems.append(f"round {round_}: stages under different parents")
        if sorted(c.data.tags["e4srec.stage"] for c in children) != ["instruction-tune", "prepare-data"]:
            problems.append(f"round {round_}: stage runs {sorted(c.data.tags['e4srec.stage'] for c in children)}")
    assert not problems, "\n".join(problems)
