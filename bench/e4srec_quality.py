"""E4SRec quality on a reference dataset: train-e4srec's model and loop, test metrics next to the paper's.

    python bench/e4srec_quality.py --data <prepared Beauty> --sasrec <pretrain-sasrec output> \\
        --device cuda --batch-size 256 --lr 1e-3 --epochs 2 --json out.json

Trains on every training example (or `--max-examples`), then ranks the whole catalog for the
validation and test positions of every user (or `--eval-users`) with the prefix cache. Prints one
JSON object: the command, machine, epochs, training and ranking wall time and throughput, valid and
test metrics (full ranking with the history masked, and sampled-99), the SASRec table's own test
metrics, that SASRec scored by the same evaluator on the same users (`sasrec_same_users`), and the
paper's Table 3 row. Imports no MLflow, KFP or matplotlib, so it runs on a bare GPU
machine. The backbone is loaded directly (`--backbone`, e.g. gguf:PATH there), not from an
instruction-tune output: SmolLM2-Instruct skips that stage in the default pipeline anyway. Its
precision is --dtype; it is never quantized here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from benchlib import command, emit, machine
from e4srec import config as cfg
from e4srec import contracts as c
from e4srec import published
from e4srec import sasrec as sasrec_model
from e4srec.backbones import BackboneOptions, load_backbone
from e4srec.data import seeded_subset
from e4srec.device import resolve_device
from e4srec.evaluate import evaluate
from e4srec.stages import train_e4srec as stage
from e4srec.tracking import Tracker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="prepare-data output (e.g. of data/Beauty.txt)")
    parser.add_argument("--sasrec", type=Path, required=True, help="pretrain-sasrec output on the same data")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--backbone", default="smollm2-135m", help="LLM spec (precision: --dtype)")
    cfg.add_arguments(parser, stage.TrainE4SRecConfig)
    args = parser.parse_args(argv)
    config = cfg.from_namespace(stage.TrainE4SRecConfig, args)
    options = BackboneOptions(backbone=args.backbone, dtype=config.dtype)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_start = time.perf_counter()

    data = c.load_sequence_data(args.data)
    table = sasrec_model.load_item_embeddings(args.sasrec, data.item_map_sha256)
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    backbone = load_backbone(options, device)
    load_seconds = time.perf_counter() - t0
    model = stage.build_model(config, backbone, table, data.n_items, data.max_len).to(device)
    histories, targets = data.prefix_examples(config.max_targets_per_user)
    keep = seeded_subset(len(targets), config.max_examples, config.seed)
    if keep is not None:
        histories, targets = histories[keep], targets[keep]

    sync()
    t0 = time.perf_counter()
    log = stage.train(config, model, histories, targets, device, None, Tracker(None), progress=True)
    sync()
    train_seconds = time.perf_counter() - t0

    users = seeded_subset(data.n_users, config.eval_users, config.seed)
    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    cache = model.prefix_cache() if config.prefix_cache else None
    for split in c.SPLITS:
        result = evaluate(lambda h: model.score_all_items(h, cache), data, split,
                          batch_size=config.eval_batch_size, device=device, users=users, progress=True)
        metrics |= result.metrics()
        n_users = len(result.history_lengths)
    sync()
    eval_seconds = time.perf_counter() - t0

    sasrec_metrics = json.loads((args.sasrec / c.METRICS).read_text())
    # SASRec scored by the same evaluator on the same users: the baseline this run must beat.
    sasrec = sasrec_model.load_model(args.sasrec, data).to(device).eval()
    sasrec_same: dict[str, float] = {}
    for split in c.SPLITS:
        sasrec_same |= evaluate(sasrec.score_all_items, data, split, batch_size=256, device=device, users=users,
                                progress=False).metrics()
    reference = published.for_dataset(str(data.manifest["input"]["name"]))
    steps_per_epoch = len(log) / max(config.epochs, 1)
    result = {
        "command": command(),
        "machine": machine(device),
        "dataset": data.manifest["input"]["name"],
        "backbone": cfg.to_dict(options), "dtype": str(next(backbone.model.parameters()).dtype),
        "backbone_load_seconds": round(load_seconds, 1),
        "config": cfg.to_dict(config),
        "examples": len(targets),
        "optimizer_steps": len(log),
        "train_seconds": round(train_seconds, 1),
        "seconds_per_epoch": round(train_seconds / config.epochs, 1),
        "examples_per_second": round(len(targets) * config.epochs / train_seconds, 1),
        "loss_first_last": [round(log[0]["train/loss"], 4), round(log[-1]["train/loss"], 4)] if log else None,
        "loss_per_epoch_end": [round(log[int((e + 1) * steps_per_epoch) - 1]["train/loss"], 4)
                               for e in range(config.epochs)] if log else None,
        "eval_users": n_users,
        "eval_seconds": round(eval_seconds, 1),
        "eval_users_per_second": round(len(c.SPLITS) * n_users / eval_seconds, 1),
        "metrics": {k: round(v, 4) for k, v in metrics.items()},
        "sasrec_test": {k: round(v, 4) for k, v in sasrec_metrics.items() if k.startswith("test/")},
        "sasrec_same_users": {k: round(v, 4) for k, v in sasrec_same.items()},
        "sasrec_source": str(args.sasrec),
        "published": reference,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
