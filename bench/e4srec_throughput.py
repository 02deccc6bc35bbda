"""E4SRec throughput: full ranking with and without the prefix cache, and training, at E4SRec shapes.

    python bench/e4srec_throughput.py --data .cache/bench-data/Beauty --device cpu --threads 2
    python bench/e4srec_throughput.py --data <prepared Beauty> --device cuda --rank-batch 1024 --train-batch 256

Ranking: `evaluate()` (scoring + full and sampled ranks) over a seeded sample of test users, once with
the instruction tokens' keys/values cached and once recomputing them, same batch size, after a warm-up
batch. Training: optimizer steps on seeded, length-bucketed training examples (every prefix of the
training sequence, as the stage trains), on the same batches with the instruction tokens computed per
row and once per batch (the stage's default). The SASRec table is random with the data's shape:
speed does not depend on its values. Imports no MLflow or KFP, so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import command, emit, machine
from e4srec import contracts as c
from e4srec.backbones import BackboneOptions, load_backbone
from e4srec.evaluate import evaluate
from e4srec.stages import train_e4srec as stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="prepare-data output (e.g. of data/Beauty.txt)")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--users", type=int, default=256, help="test users ranked per variant")
    parser.add_argument("--rank-batch", type=int, default=32)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per ranking variant")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = c.load_sequence_data(args.data)
    torch.manual_seed(0)
    table = torch.randn(data.n_items + 1, 64) * 0.1
    table[0] = 0
    backbone = load_backbone(BackboneOptions(backbone=args.backbone, dtype=args.dtype), device)
    config = stage.TrainE4SRecConfig(batch_size=args.train_batch, device=args.device)
    model = stage.build_model(config, backbone, table, data.n_items, data.max_len).to(device).eval()
    users = np.sort(np.random.default_rng(0).choice(data.n_users, args.users, replace=False))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    ranking = {}
    for name, use_cache in (("no prefix cache", False), ("prefix cache", True)):
        times = []
        evaluate(lambda h: model.score_all_items(h), data, "test", batch_size=args.rank_batch, device=device,
                 users=users[: args.rank_batch], progress=False)  # warm-up
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            cache = model.prefix_cache() if use_cache else None  # computed inside the timing
            result = evaluate(lambda h: model.score_all_items(h, cache), data, "test",  # noqa: B023
                              batch_size=args.rank_batch,
                              device=device, users=users, progress=False)
            sync()
            times.append(time.perf_counter() - t0)
        ranking[name] = {"users_per_second": round(len(users) / min(times), 2), "seconds": [round(t, 2) for t in times],
                         "test/full/HR@10": result.metrics()["test/full/HR@10"]}
    speedup = ranking["prefix cache"]["users_per_second"] / ranking["no prefix cache"]["users_per_second"]

    histories, targets = data.prefix_examples(config.max_targets_per_user)
    lengths = (histories > 0).sum(1)
    batches = stage.epoch_batches(lengths, config, epoch=0)[: args.train_steps + 1]
    model.train()
    params = list(model.trainable_state().values())
    opt = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    training = {}
    for name, shared in (("per-row prefix", False), ("shared prefix", True)):
        seen, tokens, t0 = 0, 0, 0.0
        for i, rows in enumerate(batches):
            if i == 1:  # the first step is warm-up
                sync()
                t0, seen, tokens = time.perf_counter(), 0, 0
            width = max(int(lengths[rows].max()), 1)
            hist = torch.as_tensor(histories[rows, -width:], device=device)
            with autocast:
                loss = model.loss(hist, torch.as_tensor(targets[rows], device=device), shared_prefix=shared)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen += len(rows)
            tokens += len(rows) * (width + len(model.prefix_ids) + len(model.suffix_ids))
        sync()
        rate = seen / (time.perf_counter() - t0)
        training[name] = {"sequences_per_second": round(rate, 2), "epoch_estimate_seconds": round(len(targets) / rate)}
    speedup_train = training["shared prefix"]["sequences_per_second"] / training["per-row prefix"]["sequences_per_second"]
    result = {
        "command": command(),
        "machine": machine(device),
        "backbone": args.backbone, "dtype": str(next(backbone.model.parameters()).dtype),
        "prefix_tokens": len(model.prefix_ids), "suffix_tokens": len(model.suffix_ids),
        "ranking": {"users": args.users, "batch": args.rank_batch, **ranking, "cache_speedup": round(speedup, 2)},
        "training": {"batch": args.train_batch, "steps_timed": len(batches) - 1,
                     "mean_prompt_tokens": round(tokens / max(seen, 1), 1), "training_examples": len(targets),
                     **training, "shared_prefix_speedup": round(speedup_train, 2),
                     # what train-e4srec does by default
                     "sequences_per_second": training["shared prefix"]["sequences_per_second"],
                     "epoch_estimate_seconds": training["shared prefix"]["epoch_estimate_seconds"]},
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
