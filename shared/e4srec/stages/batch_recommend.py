"""Stage batch-recommend: top-k original item ids for every user of a dataset, as Parquet.

Output folder: recommendations.parquet (user_id, items list<string>, scores list<float>), metrics.json.
Each user's whole sequence (everything known about them) is the query, cut to the model's
max_len; the history's own items are never recommended.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from e4srec import config as cfg
from e4srec import contracts as c
from e4srec.errors import E4SRecError
from e4srec.outputs import preflight, staged_output
from e4srec.progress import progress as progress_bar
from e4srec.recommend import Recommender
from e4srec.settings import BatchRecommendConfig
from e4srec.storage import fetch
from e4srec.tracking import Tracker, tracked
from e4srec.trained import read_config

STAGE = "batch-recommend"
OUTPUT = "recommendations.parquet"


def check(config: BatchRecommendConfig, model_dir: Path | str, data_dir: Path | str, output: Path | str,
          overwrite: bool = False) -> None:
    """Refuse, before any work, an output that is not free or that overlaps the inputs."""
    registered = str(model_dir).startswith("models:/")
    preflight(output, overwrite, {"--data": data_dir} | ({} if registered else {"--model": model_dir}))


def run(config: BatchRecommendConfig, model_dir: Path | str, data_dir: Path | str, output: Path | str, *,
        overwrite: bool = False, tracker: Tracker | None = None, progress: bool = True) -> dict[str, float]:
    """Write top-k recommendations for the users of `data_dir` with the model in `model_dir`."""
    from e4srec.device import resolve_device

    tracker = tracker or Tracker(None)
    registered = str(model_dir).startswith("models:/")
    check(config, model_dir, data_dir, output, overwrite)
    data = c.load_sequence_data(fetch(data_dir))
    backbone = None
    if registered:  # the registered model's own files: its folder and, for an E4SRec, its logged backbone
        from e4srec import registry

        model_dir, backbone = registry.download(str(model_dir))
    model_dir = fetch(model_dir)
    _, meta = read_config(model_dir)
    if meta.get("item_map_sha256") != data.item_map_sha256 and "extended_from" not in meta:
        raise E4SRecError(f"{model_dir}: trained on another item map than {data_dir}; recommend for its own data")
    recommender = Recommender(model_dir, str(resolve_device(config.device)), backbone=backbone)
    n = min(data.n_users, config.max_users or data.n_users)
    t0 = time.perf_counter()
    # Users in order of history length, as the evaluator scores them: a batch is padded to its longest
    # history, so mixing lengths costs up to max_len positions per user; results go back in user order.
    lengths = np.array([min(len(data.sequence(u)), recommender.max_len) for u in range(n)])
    order = np.argsort(lengths, kind="stable")
    found: list = [None] * n
    for s in progress_bar(range(0, n, config.batch_size), desc=STAGE, unit="batch", disable=not progress):
        rows = order[s : s + config.batch_size]
        histories = [[str(data.item_ids[i]) for i in data.sequence(u)[-recommender.max_len:]] for u in rows]
        for u, rec in zip(rows, recommender.recommend(histories, config.k, batch_size=config.batch_size)):
            found[u] = rec
    users = [str(data.user_ids[u]) for u in range(n)]
    items = [rec.items for rec in found]
    scores = [rec.scores for rec in found]
    seconds = time.perf_counter() - t0
    metrics = {"batch/users": float(n), "batch/seconds": seconds, "batch/users_per_second": n / max(seconds, 1e-9)}
    with staged_output(output, overwrite) as out:
        pq.write_table(pa.table({"user_id": pa.array(users, pa.string()),
                                 "items": pa.array(items, pa.list_(pa.string())),
                                 "scores": pa.array(scores, pa.list_(pa.float32()))}), out / OUTPUT)
        c.write_json(out / c.METRICS, metrics)
        tracker.log_params(cfg.to_dict(config))
        tracker.log_metrics(metrics)
    return metrics


run_tracked = tracked(STAGE, check)(run)
