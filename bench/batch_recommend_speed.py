"""batch-recommend against the evaluator: users per second for the same model, data and users.

    python bench/batch_recommend_speed.py --model runs/<run>/train-e4srec/model \
        --data runs/<run>/prepare-data/data [--users 0] [--eval-users 1000] --json bench/results/<date>-cpu/batch_recommend.json

batch-recommend ranks every user's whole history (cut to max_len) against the whole catalog and
writes the top-k; the evaluator ranks the test split (histories one item shorter) and computes
metrics. Both score with the model's prefix cache in batches of 64. `--users 0` is every user.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import command, emit, machine  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="train-e4srec or pretrain-sasrec output folder")
    parser.add_argument("--data", required=True, help="its prepare-data output")
    parser.add_argument("--users", type=int, default=0, help="batch-recommend the first N users (0: all)")
    parser.add_argument("--eval-users", type=int, default=1000, help="users the evaluator ranks (seeded; 0: all)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch

    from e4srec import contracts as c
    from e4srec.data import seeded_subset
    from e4srec.evaluate import evaluate
    from e4srec.recommend import Recommender
    from e4srec.stages import batch_recommend

    if args.threads:
        torch.set_num_threads(args.threads)
    data = c.load_sequence_data(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        metrics = batch_recommend.run(batch_recommend.BatchRecommendConfig(k=args.k, max_users=args.users, device="cpu"),
                                      args.model, args.data, Path(tmp) / "out", progress=False)
        batch_wall = time.perf_counter() - t0
    recommender = Recommender(args.model)  # the evaluator scores the same loaded model the stage loads
    users = seeded_subset(data.n_users, args.eval_users, 42)
    t1 = time.perf_counter()
    with torch.no_grad():
        evaluate(recommender.model.score, data, "test", batch_size=64, users=users, progress=False)
    eval_seconds = time.perf_counter() - t1
    n_eval = data.n_users if users is None else len(users)
    emit({"command": command(), "machine": machine(), "model": str(args.model), "kind": recommender.model.kind,
          "batch_recommend": {"users": int(metrics["batch/users"]), "seconds": round(metrics["batch/seconds"], 1),
                              "users_per_second": round(metrics["batch/users_per_second"], 2),
                              "wall_seconds_with_loading": round(batch_wall, 1)},
          "evaluator": {"users": n_eval, "seconds": round(eval_seconds, 1),
                        "users_per_second": round(n_eval / eval_seconds, 2)},
          "mean_history_length": float(np.mean([min(len(data.sequence(u)), data.max_len) for u in range(data.n_users)]))},
         args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
