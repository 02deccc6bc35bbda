"""E4SRec on a whole dataset, resumable across sessions: train-e4srec itself, then one result JSON.

    python bench/e4srec_full.py --data <prepared Beauty> --sasrec <BCE SASRec> --sasrec-ce <CE SASRec> \\
        --output .cache/full/beauty-e4srec --json bench/results/<date>-cpu/e4srec_beauty_full.json \\
        --threads 2 --checkpoint-every 100 [train-e4srec settings...]

Runs `e4srec.stages.train_e4srec.run` (the stage, untracked) with `--resume` always on, so the same
command started again after a stop (a session's end, a kill) continues from the last checkpoint in
`OUTPUT.checkpoints` and ends with the result an unbroken run gives. Each start is recorded in
`OUTPUT.sessions.json` (start and end; a stopped session ends at its last checkpoint, the work after
it being done again), so the wall time adds up across stops.
At the end it writes one JSON: command, commit, machine with its CPU flags, sessions and wall time,
settings, epochs, the E4SRec valid/test table (full ranking over all items and sampled-99, every user
unless --eval-users), and beside it the SASRec BCE and CE tables of the same split (their own
metrics.json, computed by the same evaluator on every user) and the paper's rows, and all three by
history length.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchlib import command, commit, emit, machine
from e4srec import checkpoints, published
from e4srec import config as cfg
from e4srec import contracts as c
from e4srec.stages import train_e4srec as stage

KEYS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "MRR")
SASREC_TRAINING = ("epochs", "best_epoch", "seconds", "seconds_per_epoch")  # pretrain-sasrec's train/* metrics


def table(metrics: dict[str, float]) -> dict[str, float]:
    """The valid/test rows worth printing, rounded."""
    return {f"{s}/{p}/{k}": round(metrics[f"{s}/{p}/{k}"], 4) for s in ("valid", "test") for p in ("full", "sampled")
            for k in KEYS if f"{s}/{p}/{k}" in metrics}


def lengths(folder: Path) -> dict[str, dict[str, float]]:
    """Test, full ranking: users, HR@10 and NDCG@10 per history-length group (metrics_by_length.json)."""
    groups = c.read_json(folder / "metrics_by_length.json")["test"]["full"]
    return {g: {"users": v["users"], "HR@10": round(v["HR@10"], 4), "NDCG@10": round(v["NDCG@10"], 4)}
            for g, v in groups.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="prepare-data output")
    parser.add_argument("--sasrec", type=Path, required=True, help="pretrain-sasrec output E4SRec reads (its table)")
    parser.add_argument("--sasrec-ce", type=Path, help="a CE pretrain-sasrec output, for its row in the table")
    parser.add_argument("--sasrec-bce", type=Path, help="a BCE pretrain-sasrec output, for its row (default: --sasrec "
                                                         "when that is BCE)")
    parser.add_argument("--backbone", default="smollm2-135m", help="backbone spec or instruction-tune output")
    parser.add_argument("--output", type=Path, required=True, help="the stage's output folder")
    parser.add_argument("--json", type=Path, required=True, help="where the result goes")
    cfg.add_arguments(parser, stage.TrainE4SRecConfig)
    args = parser.parse_args(argv)
    config = cfg.from_namespace(stage.TrainE4SRecConfig, args)
    config.resume = True
    if not config.checkpoint_every:
        parser.error("--checkpoint-every N is what makes the run resumable; give it")

    sessions_file = args.output.with_name(args.output.name + ".sessions.json")
    sessions = json.loads(sessions_file.read_text()) if sessions_file.is_file() else []
    progress = checkpoints.checkpoint_root(config.checkpoint_dir, args.output) / "progress.json"
    if sessions and sessions[-1]["end"] is None:  # stopped: its work counts up to its last checkpoint
        sessions[-1]["end"] = progress.stat().st_mtime if progress.is_file() else sessions[-1]["start"]
        sessions[-1]["stopped"] = True
    if not (args.output / c.METRICS).is_file():
        sessions.append({"start": time.time(), "end": None, "command": command(), "commit": commit()})
        sessions_file.parent.mkdir(parents=True, exist_ok=True)
        sessions_file.write_text(json.dumps(sessions, indent=1) + "\n")
        stage.run(config, args.data, args.sasrec, args.backbone, args.output, progress=True)
        sessions[-1]["end"] = time.time()
        sessions_file.write_text(json.dumps(sessions, indent=1) + "\n")

    metrics = c.read_json(args.output / c.METRICS)
    data = c.load_sequence_data(args.data)
    rows = {"E4SRec (ours)": table(metrics)}
    by_length = {"E4SRec (ours)": lengths(args.output)}
    sasrec_meta = c.read_json(args.sasrec / "config.json")
    bce = args.sasrec_bce or (args.sasrec if sasrec_meta["train"]["loss"] == "bce" else None)
    sasrecs = {}
    for name, folder in (("SASRec BCE (ours)", bce), ("SASRec CE (ours)", args.sasrec_ce)):
        if folder is not None:
            sasrec_metrics = c.read_json(folder / c.METRICS)
            rows[name] = table(sasrec_metrics)
            by_length[name] = lengths(folder)
            trained = c.read_json(folder / "config.json")["train"]
            sasrecs[name] = {"source": str(folder), "loss": trained["loss"], "threads": trained["threads"],
                             **{k: round(sasrec_metrics[f"train/{k}"], 1) for k in SASREC_TRAINING}}
    wall = sum((s["end"] or s["start"]) - s["start"] for s in sessions)
    log = json.loads((args.output / "training_log.json").read_text())
    result = {
        "command": sessions[0]["command"] if sessions else command(),
        "commit": sessions[-1]["commit"] if sessions else commit(),
        "machine": machine("cpu"),
        "dataset": data.manifest["input"]["name"],
        "sessions": sessions,
        "wall_seconds": round(wall),
        "config": cfg.to_dict(config),
        "sasrec_table": {"source": str(args.sasrec), "loss": sasrec_meta["train"]["loss"]},
        "sasrec_training": sasrecs,
        "examples": metrics["train/examples"],
        "epochs": config.epochs,
        "optimizer_steps": metrics["train/steps"],
        "train_seconds_last_session": round(metrics["train/seconds"]),
        "loss_first_last": [round(metrics["train/loss_first"], 4), round(metrics["train/loss_last"], 4)],
        "loss_per_epoch_mean": [round(sum(r["train/loss"] for r in log if e < r["epoch"] <= e + 1)
                                      / max(1, sum(1 for r in log if e < r["epoch"] <= e + 1)), 4)
                                for e in range(config.epochs)],
        "eval_users": metrics["eval/users"],
        "eval_users_per_second": round(metrics["eval/users_per_second"], 1),
        "table": rows,
        "test_full_by_history_length": by_length,
        "published": published.for_dataset(str(data.manifest["input"]["name"])),
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
