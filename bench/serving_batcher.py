"""The served model's request batcher in-process: N threads of single-user requests, with and without lingering.

    python bench/serving_batcher.py --model <train-e4srec output> --data <its prepare-data output> \\
        --clients 8 --users 200 --linger-ms 15

`MicroBatcher` (what the served pyfunc uses) scores whatever arrived while the previous batch ran,
waiting up to `--linger-ms` for as many requests as the previous batch held; it is timed with that
wait and without it (`linger_s=0`), and beside a variant that waits up to `--linger-ms` for the
batch to reach `--clients` users (which knows the load in advance).
Both get the same users' histories (drawn with the seed, last max_len items, k=10); printed: users/s.
Before that, `Recommender.recommend` alone is timed on fixed shapes (users x history length, and eight
real users' histories) for each of `--dtypes` and `--scorings` (an E4SRec's histories packed into one
sequence, or left-padded batches), 3 s each: what one forward pass costs, and what each more position
adds. No HTTP, no MLflow: the model's side of serving only.
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from benchlib import command, emit, machine
from e4srec import contracts as c
from e4srec.recommend import MicroBatcher, Recommender


class Lingering(MicroBatcher):
    """MicroBatcher that waits up to `linger` seconds for `target` users before scoring."""

    linger, target = 0.015, 8

    def _work(self) -> None:
        while True:
            jobs = [self.pending.get()]
            deadline = time.perf_counter() + self.linger
            while sum(len(j[0]) for j in jobs) < self.target:
                try:
                    jobs.append(self.pending.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
            histories = [h for j in jobs for h in j[0]]
            results = self.recommender.recommend(histories, [k for j in jobs for k in j[1]], batch_size=64)
            start = 0
            for job_histories, _, future in jobs:
                future.set_result(results[start : start + len(job_histories)])
                start += len(job_histories)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="train-e4srec (or pretrain-sasrec) output folder")
    parser.add_argument("--data", required=True, help="its prepare-data output")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--linger-ms", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the result here too")
    parser.add_argument("--dtypes", nargs="*", default=["bf16", "fp32"], help="backbone precisions for the shape timings")
    parser.add_argument("--scorings", nargs="*", default=["packed", "padded"],
                        help="packed: an E4SRec's histories in one sequence (the default); padded: left-padded batches")
    args = parser.parse_args(argv)
    result = {"command": command(), "machine": machine(), "ms_per_call": {}, "users_per_s": {}}
    data = c.load_sequence_data(args.data)
    users = np.random.default_rng(args.seed).choice(data.n_users, args.users, replace=False)
    histories = [[str(data.item_ids[i]) for i in data.sequence(int(u))[-data.max_len:]] for u in users]
    result["histories"] = {"users": len(histories), "mean_items": round(float(np.mean([len(h) for h in histories])), 2)}

    def scoring(recommender: Recommender, how: str) -> Recommender:
        if how == "padded":
            recommender.model.score_packed = None
        return recommender

    for dtype in args.dtypes:
        for how in args.scorings:
            timed = scoring(Recommender(args.model, dtype=dtype), how)
            ids = timed.item_ids[1:]
            shapes = {f"{u}x{n}": [[ids[(31 * i + j) % len(ids)] for j in range(n)] for i in range(u)]
                      for u, n in ((1, 3), (1, 8), (1, 50), (8, 8), (8, 50), (64, 8), (64, 50))}
            shapes["8 users"] = histories[:8]  # real lengths: what eight concurrent requests bring
            for shape, batch in shapes.items():
                timed.recommend(batch, 10)  # warm-up
                t0, calls = time.perf_counter(), 0
                while time.perf_counter() - t0 < 3:
                    timed.recommend(batch, 10)
                    calls += 1
                result["ms_per_call"][f"{dtype} {how} {shape}"] = round((time.perf_counter() - t0) / calls * 1000, 1)
    Lingering.linger, Lingering.target = args.linger_ms / 1000, args.clients
    for how in args.scorings:
        recommender = scoring(Recommender(args.model), how)
        batchers = {"MicroBatcher": MicroBatcher(recommender, linger_s=args.linger_ms / 1000),
                    "MicroBatcher no linger": MicroBatcher(recommender, linger_s=0.0),
                    "Lingering to --clients": Lingering(recommender)}
        for name, batcher in batchers.items():
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(lambda h: batcher.recommend([h], [10]), histories))  # noqa: B023 (batcher of this pass)
            result["users_per_s"][f"{name} {how}"] = round(len(histories) / (time.perf_counter() - t0), 1)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
