"""Stage prepare-data: ingest, validate, filter, index, split and sample negatives."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from e4srec import config as cfg
from e4srec import contracts as c
from e4srec import data as d
from e4srec.errors import E4SRecError
from e4srec.outputs import preflight, staged_output
from e4srec.settings import PrepareDataConfig
from e4srec.storage import fetch
from e4srec.tracking import Tracker, figure_to_artifact, tracked

STAGE = "prepare-data"


def _plot_lengths(lengths: np.ndarray, max_len: int):  # noqa: ANN202 (matplotlib figure)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(lengths, bins=np.arange(0, min(lengths.max(), 200) + 2) - 0.5, color="#4C72B0")
    ax.axvline(max_len + 0.5, color="#C44E52", ls="--", label=f"max_len = {max_len}")
    ax.set(xlabel="interactions per user", ylabel="users", yscale="log", title="Sequence lengths")
    ax.legend()
    return fig


def check(config: PrepareDataConfig, input_path: Path | str, output: Path | str, overwrite: bool = False) -> None:
    """Refuse, before any work, an output that is not free or that overlaps the input."""
    preflight(output, overwrite, {"--input": input_path})


def run(config: PrepareDataConfig, input_path: Path | str, output: Path | str, *, overwrite: bool = False,
        tracker: Tracker | None = None) -> dict[str, float]:
    """Read `input_path`, write the prepare-data contract into `output`, return its metrics."""
    tracker = tracker or Tracker(None)
    check(config, input_path, output, overwrite)
    input_path = Path(fetch(input_path))
    if input_path.is_dir():
        raise E4SRecError(f"{input_path}: is a folder; --input takes a file (S3-Rec .txt, .csv, .tsv or .parquet)")
    if not input_path.is_file():
        raise E4SRecError(f"{input_path}: input file not found")
    t0 = time.perf_counter()
    fmt = d.detect_format(input_path) if config.format == "auto" else config.format
    if fmt == "s3rec":
        df = d.read_s3rec(input_path)
    else:
        if input_path.suffix.lower() not in d.TABLE_SUFFIXES:
            raise E4SRecError(f"{input_path}: interactions tables must be .parquet, .pq, .csv or .tsv")
        df = d.read_interactions(input_path, config.user_col, config.item_col, config.time_col)
    raw_users, raw_items, raw_rows = df["user_id"].nunique(), df["item_id"].nunique(), len(df)
    df = d.k_core(df, config.k_core)
    if df.empty:
        raise E4SRecError(f"{input_path}: nothing is left after the {config.k_core}-core filter; lower --k-core")
    user_ids, sequences, item_ids, dropped = d.build_sequences(df)
    negatives = d.sample_negatives(sequences, len(item_ids), config.n_negatives, config.seed)
    lengths = np.array([len(s) for s in sequences])

    manifest = {
        "format_version": c.FORMAT_VERSION,
        "stage": STAGE,
        "config": cfg.to_dict(config),
        "input": {"name": input_path.name, "format": fmt, "sha256": c.file_sha256(input_path)},
        "n_users": len(user_ids),
        "n_items": len(item_ids),
        "n_interactions": int(lengths.sum()),
        "max_len": config.max_len,
        "n_negatives": config.n_negatives,
        "seed": config.seed,
        "item_map_sha256": c.item_map_hash(item_ids.tolist()),
        "dropped": {
            "rows_by_k_core": raw_rows - len(df),
            "users_with_fewer_than_3": dropped,
        },
        "raw": {"users": int(raw_users), "items": int(raw_items), "interactions": int(raw_rows)},
    }
    metrics = {
        "data/users": float(len(user_ids)),
        "data/items": float(len(item_ids)),
        "data/interactions": float(lengths.sum()),
        "data/avg_length": float(lengths.mean()),
        "data/density": float(lengths.sum() / (len(user_ids) * len(item_ids))),
        "data/histories_cut": float((lengths - 1 > config.max_len).sum()),
    }
    list_type = pa.list_(pa.int32())
    with staged_output(output, overwrite) as out:
        pq.write_table(
            pa.table({
                "user": pa.array(np.arange(len(user_ids)), pa.int32()),
                "user_id": pa.array(user_ids.tolist(), pa.string()),
                "items": pa.array([s.tolist() for s in sequences], list_type),
            }),
            out / c.SEQUENCES,
        )
        pq.write_table(
            pa.table({
                "item": pa.array(np.arange(1, len(item_ids) + 1), pa.int32()),
                "item_id": pa.array(item_ids.tolist(), pa.string()),
            }),
            out / c.ITEM_MAP,
        )
        pq.write_table(
            pa.table({
                "user": pa.array(np.arange(len(user_ids)), pa.int32()),
                "negatives": pa.array(negatives.tolist(), list_type),
            }),
            out / c.NEGATIVES,
        )
        c.write_json(out / c.MANIFEST, manifest)
        c.write_json(out / c.METRICS, metrics)
        c.load_sequence_data(out)  # the reader's checks, once, before the folder is put in place
        tracker.log_params(cfg.to_dict(config))
        tracker.log_params({"input": input_path.name, "input_sha256": manifest["input"]["sha256"]})
        tracker.log_metrics(metrics | {"data/seconds": time.perf_counter() - t0})
        tracker.log_artifact(out / c.MANIFEST)
        figure_to_artifact(tracker, _plot_lengths(lengths, config.max_len), "sequence_lengths.png", out)
    return metrics


run_tracked = tracked(STAGE, check)(run)
