"""`e4srec extend-items`: add items to a trained E4SRec without touching the LLM or LoRA.

E4SRec's claim of extensibility rests on its item side being two tables: the frozen SASRec embeddings
(input) and the item head (output). A new item needs a row in each:
- input: its SASRec-space vector, given by the user (e.g. from SASRec retrained with the new items);
- head: there is no trained row, so it is predicted from that vector. A ridge regression from SASRec
  embeddings to head rows is fitted on the existing items (whose head rows were trained) and applied
  to the new ones; the new item then scores like the old items whose embeddings it resembles.
Old rows are copied unchanged, so every old item's score is exactly what it was.

New items file: Parquet with `item_id` (string, not already in the model) and `embedding`
(list<float> of the SASRec dimension).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from e4srec import contracts as c
from e4srec.e4srec import CONFIG, HEAD
from e4srec.errors import E4SRecError
from e4srec.outputs import staged_output
from e4srec.sasrec import EMBEDDINGS, load_item_embeddings, save_item_embeddings
from e4srec.trained import read_config


def read_new_items(path: Path, dim: int, known: set[str]) -> tuple[list[str], torch.Tensor]:
    """(ids, (K, dim) embeddings) from the new-items Parquet, validated row by row."""
    if not path.is_file():
        raise E4SRecError(f"{path}: new-items file not found")
    try:
        table = pq.read_table(path)
    except pa.ArrowInvalid as e:
        raise E4SRecError(f"{path}: not a readable Parquet file ({e})") from None
    for col in ("item_id", "embedding"):
        if col not in table.column_names:
            raise E4SRecError(f"{path}: missing column {col!r} (has {', '.join(table.column_names)})")
    raw_ids = table.column("item_id").to_pylist()
    vectors = table.column("embedding").to_pylist()
    seen: set[str] = set()
    for row, (raw, vec) in enumerate(zip(raw_ids, vectors)):
        item = "" if raw is None else str(raw).strip()
        if not item:
            raise E4SRecError(f"{path} row {row}: item_id is {'null' if raw is None else 'empty'}; every new item needs an id")
        if item in known or item in seen:
            raise E4SRecError(f"{path} row {row}: item {item!r} is already in the model; new items only")
        if not isinstance(vec, list) or len(vec) != dim:
            length = len(vec) if isinstance(vec, list) else 0
            raise E4SRecError(f"{path} row {row}: embedding of length {length}, expected a list of {dim} numbers")
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in vec):
            raise E4SRecError(f"{path} row {row}: embedding of item {item!r} holds a null, NaN or infinite value; "
                              f"every value must be a finite number")
        seen.add(item)
    ids = [str(x).strip() for x in raw_ids]
    if not ids:
        raise E4SRecError(f"{path}: no rows")
    return ids, torch.tensor(np.asarray(vectors, dtype=np.float32))


def fit_head_rows(old_emb: torch.Tensor, old_head: torch.Tensor, new_emb: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """Head rows for new items: ridge regression [emb, 1] -> head row, fitted on the old items."""
    X = torch.cat([old_emb, torch.ones(len(old_emb), 1)], 1).double()  # (N, d+1)
    A = X.T @ X + ridge * len(X) * torch.eye(X.shape[1], dtype=X.dtype)
    W = torch.linalg.solve(A, X.T @ old_head.double())  # (d+1, H)
    return (torch.cat([new_emb, torch.ones(len(new_emb), 1)], 1).double() @ W).float()  # (K, H)


def extend_items(model_dir: Path | str, new_items: Path | str, output: Path | str, *, overwrite: bool = False) -> dict:
    """Write a copy of the model folder with the new items appended as indices N+1..N+K."""
    from e4srec.outputs import preflight
    from e4srec.storage import fetch

    preflight(output, overwrite, {"--model": model_dir, "--new-items": new_items})
    model_dir, new_items = Path(fetch(model_dir)), Path(fetch(new_items))
    kind, meta = read_config(model_dir)
    if kind != "e4srec":
        raise E4SRecError(f"{model_dir}: a SASRec model; extend-items adds items to a train-e4srec output (a "
                          f"SASRec learns its items from its data: re-run pretrain-sasrec)")
    table = load_item_embeddings(model_dir, meta["item_map_sha256"])  # (N+1, d)
    old_ids = pq.read_table(model_dir / c.ITEM_MAP).column("item_id").to_pylist()
    ids, vectors = read_new_items(new_items, table.shape[1], set(old_ids))
    head = c.read_safetensors(model_dir / HEAD)
    new_head = fit_head_rows(table[1:], head["head.weight"][1:], vectors)
    all_ids = old_ids + ids
    new_hash = c.item_map_hash(all_ids)
    with staged_output(output, overwrite) as out:
        for entry in model_dir.iterdir():  # the LLM side (adapters) is copied byte for byte
            if entry.name not in (HEAD, CONFIG, c.ITEM_MAP, EMBEDDINGS, c.METRICS):
                (shutil.copytree if entry.is_dir() else shutil.copyfile)(entry, out / entry.name)
        save_file({**head, "head.weight": torch.cat([head["head.weight"], new_head]).contiguous()}, str(out / HEAD))
        save_item_embeddings(out / EMBEDDINGS, torch.cat([table, vectors]), new_hash, "sasrec+extend-items")
        pq.write_table(pa.table({"item": pa.array(np.arange(1, len(all_ids) + 1), pa.int32()),
                                 "item_id": pa.array(all_ids, pa.string())}), out / c.ITEM_MAP)
        meta["model"]["n_items"] = len(all_ids)
        meta["extended_from"] = {"item_map_sha256": meta["item_map_sha256"], "n_items": len(old_ids),
                                 "added": len(ids), "head_rows": "ridge regression from SASRec embeddings"}
        meta["item_map_sha256"] = new_hash
        c.write_json(out / CONFIG, meta)
    return {"items_before": len(old_ids), "items_added": len(ids), "item_map_sha256": new_hash}
