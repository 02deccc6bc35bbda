"""Serving: `mlflow models serve` on 127.0.0.1 answers with the same top-k as `e4srec recommend`.

The served model has a bf16 backbone: the precision a GPU or a bf16-capable CPU serves in by default.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from e4srec import contracts as c
from e4srec.recommend import Recommender
from e4srec.stages import deploy
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
        _, verdict = deploy.run_tracked(deploy.DeployConfig(device="cpu", eval_users=50), root / "model", prepared,
                                        root / "deploy", experiment="serving")
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

        for bad, needle in [
            (b'{"dataframe_records": [{"hist": ["1"], "k": 3}]}', "missing inputs ['history']"),
            (b'{"dataframe_records": [{"history": ["1"], "k": -2}]}', "k must be a positive integer"),
            (b'{"dataframe_records": [{"history": "1 2", "k": 3}]}', "history"),
            (b"not json", "valid JSON"),
        ]:
            status, body = post(port, bad)
            assert status == 400 and needle in body["message"], (status, body)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
