"""A trained recommender folder of either kind (E4SRec or SASRec) behind one scoring interface.

The evaluator, the deploy gate, `recommend`, `batch-recommend` and the served pyfunc all take a
model folder and need the same four things from it: its kind, its item map, its history length and
`score(histories) -> (B, N+1)` on left-padded item indices. The folder's config.json says which
stage wrote it; this module is the one place that turns that into a loaded model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch

from e4srec import contracts as c
from e4srec.errors import E4SRecError

CONFIG = "config.json"
KINDS = {"train-e4srec": "e4srec", "pretrain-sasrec": "sasrec"}
LABELS = {"e4srec": "E4SRec", "sasrec": "SASRec"}


@dataclass
class TrainedModel:
    kind: str  # e4srec or sasrec
    folder: Path
    item_ids: list[str]  # original ids; index 0 is padding
    max_len: int
    item_map_sha256: str
    score: Callable[[torch.Tensor], torch.Tensor]  # left-padded (B, T) item indices -> (B, N+1)
    module: torch.nn.Module  # the loaded E4SRec or SASRec
    # histories of any lengths (item indices, no padding) -> (B, N+1), packed into one sequence; E4SRec only
    score_packed: Callable[[list[list[int]]], torch.Tensor] | None = None


def read_config(folder: Path | str) -> tuple[str, dict]:
    """(`e4srec` or `sasrec`, the folder's config.json); anything but a recommender folder is a one-line error."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise E4SRecError(f"{path}: file not found; pass a train-e4srec or pretrain-sasrec output folder")
    meta = c.read_model_config(path, tuple(KINDS))
    return KINDS[meta["stage"]], meta


def load(folder: Path | str, device: torch.device | str = "cpu", dtype: str | None = None,
         backbone: str | None = None, merge_adapter: bool = False) -> TrainedModel:
    """Load a model folder for scoring; `dtype` and `backbone` (a spec) replace an E4SRec's recorded ones.

    `merge_adapter`: fold an E4SRec's LoRA weights into the backbone's (unless it is quantized), so that
    a forward pass skips the 90 small adapter products; in bf16 the sums are rounded to bf16, so scores
    move by about bf16's precision. For serving; the evaluator and the gate score the adapter as trained.
    """
    folder = Path(folder)
    kind, meta = read_config(folder)
    device = torch.device(device)
    if kind == "e4srec":
        from e4srec.e4srec import load_model

        model = load_model(folder, device, dtype, backbone=backbone, meta=meta)
        if merge_adapter and meta["backbone"].get("quantization", "none") == "none":
            model.llm.merge_adapter()
        cache = model.prefix_cache()  # after any merge: the instruction's keys and values pass the adapter
        max_len = model.config.max_len

        def score(histories: torch.Tensor) -> torch.Tensor:
            return model.score_all_items(histories, cache)

        def packed(histories: list[list[int]]) -> torch.Tensor:
            return model.score_packed(histories, cache)
    else:
        if dtype or backbone:
            raise E4SRecError(f"{folder}: a SASRec model has no backbone; --dtype and a backbone apply to E4SRec")
        from e4srec.sasrec import load_model

        sasrec = load_model(folder, meta=meta).to(device)
        max_len = sasrec.config.max_len
        score, model, packed = sasrec.score_all_items, sasrec, None
    ids = ["<pad>"] + [str(x) for x in pq.read_table(folder / c.ITEM_MAP).column("item_id").to_pylist()]
    # the ids it answers with must be the ones it was trained on (or extended with)
    c.check_item_map_hash(c.item_map_hash(ids[1:]), str(meta.get("item_map_sha256", "")), str(folder / c.ITEM_MAP),
                          "the model folder's item_map.parquet was changed; restore it from the stage's output")
    return TrainedModel(kind, folder, ids, int(max_len), str(meta.get("item_map_sha256", "")), score, model, packed)
