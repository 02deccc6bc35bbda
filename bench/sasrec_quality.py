"""SASRec quality on a reference dataset: prepare-data + pretrain-sasrec, metrics next to published ones.

    python bench/sasrec_quality.py --dataset data/Beauty.txt --loss bce
    python bench/sasrec_quality.py --dataset data/Toys_and_Games.txt --loss ce --json out.json

Prints one JSON object: the command, machine, wall time, epochs, the test metrics (full ranking with
the history masked, and sampled-99) and the published reference numbers for the same files. Imports
no MLflow or KFP, so it also runs on a bare GPU machine (--device cuda).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchlib import command, emit, machine
from e4srec import config as cfg
from e4srec import contracts as c
from e4srec.evaluate import evaluate
from e4srec.stages import prepare_data, pretrain_sasrec

# Published SASRec test numbers on the S3-Rec files. bce: S3-Rec (Zhou et al. 2020), full ranking as
# reported in the E4SRec paper's Table 3 and sampled-99 from S3-Rec's Table 2. Targets from issue #2.
REFERENCE = {
    ("Beauty", "bce"): {"test/full/HR@10": 0.0605, "test/full/NDCG@10": 0.0318, "test/sampled/HR@10": 0.4696},
    ("Beauty", "ce"): {"test/full/HR@10": 0.075},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", type=Path, help="S3-Rec text file, e.g. data/Beauty.txt")
    source.add_argument("--data", type=Path, help="a prepare-data output folder instead (machines without "
                                                  "matplotlib, e.g. the bare GPU machine)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    cfg.add_arguments(parser, pretrain_sasrec.PretrainSasrecConfig)
    args = parser.parse_args(argv)
    config = cfg.from_namespace(pretrain_sasrec.PretrainSasrecConfig, args)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            prepare_data.run(prepare_data.PrepareDataConfig(), args.dataset, Path(tmp) / "data")
        data = c.load_sequence_data(args.data or Path(tmp) / "data")
        t1 = time.perf_counter()
        model, log, best_epoch = pretrain_sasrec.train(config, data, progress=True)
        train_seconds = time.perf_counter() - t1
        device = next(model.parameters()).device
        test = evaluate(model.score_all_items, data, "test", batch_size=config.eval_batch_size, device=device,
                        progress=False).metrics()
    name = str(data.manifest["input"]["name"]).split(".")[0].split("_")[0]
    reference = REFERENCE.get((name, config.loss), {})
    result = {
        "command": command(),
        "machine": machine(device),
        "dataset": data.manifest["input"]["name"],
        "config": cfg.to_dict(config),
        "epochs_run": len(log),
        "best_epoch": best_epoch,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_epoch": round(sum(r["train/seconds"] for r in log) / len(log), 2),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "test": {k: round(v, 4) for k, v in test.items()},
        "valid_ndcg10_by_epoch": [round(r[pretrain_sasrec.EARLY_STOP_METRIC], 4) for r in log
                                  if pretrain_sasrec.EARLY_STOP_METRIC in r],
        "reference": reference,
        "meets_reference": {k: test[k] >= v for k, v in reference.items()},
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
