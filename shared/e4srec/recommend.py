"""Top-k recommendations with the catalog's own item ids: the one path the CLI, batch and REST share.

Requests carry a history of original item ids. Unknown ids are dropped and reported back (never an
error: a catalog moves on and a request from a newer front end should still get an answer); a history
longer than the model's max_len keeps its last max_len items; the history's own items are never
recommended. An empty history (or one of unknown ids only) is scored from the prompt alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from e4srec import contracts as c
from e4srec.errors import E4SRecError
from e4srec.evaluate import rank_last_if_not_finite


@dataclass
class Recommendation:
    items: list[str]
    scores: list[float]
    unknown_items: list[str] = field(default_factory=list)


class Recommender:
    """A trained E4SRec plus its item map, scoring with the instruction prefix cached once."""

    def __init__(self, model_dir: Path | str, device: str = "cpu", dtype: str | None = None) -> None:
        from e4srec.stages import train_e4srec
        from e4srec.storage import fetch

        self.model_dir = Path(fetch(model_dir))
        self.model = train_e4srec.load_model(self.model_dir, device, dtype)
        self.device = torch.device(device)
        self.item_ids = ["<pad>"] + [str(x) for x in pq.read_table(self.model_dir / c.ITEM_MAP).column("item_id").to_pylist()]
        self.index = {item: i for i, item in enumerate(self.item_ids) if i}
        self.max_len = self.model.config.max_len
        self.cache = self.model.prefix_cache()

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    def encode(self, history: list[str]) -> tuple[list[int], list[str]]:
        """(item indices of the last max_len known ids, unknown ids in request order)."""
        known, unknown = [], []
        for item in history:
            (known.append(self.index[str(item)]) if str(item) in self.index else unknown.append(str(item)))
        return known[-self.max_len :], unknown

    @torch.no_grad()
    def recommend(self, histories: list[list[str]], k: int | list[int], batch_size: int = 64) -> list[Recommendation]:
        """Top-k per history; `k` per request or one for all."""
        ks = [k] * len(histories) if isinstance(k, int) else list(k)
        for i, value in enumerate(ks):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise E4SRecError(f"request {i}: k={value!r}; k must be a positive integer")
        encoded = [self.encode(list(h)) for h in histories]
        out: list[Recommendation] = []
        for s in range(0, len(encoded), batch_size):
            chunk = encoded[s : s + batch_size]
            width = max(1, max(len(ix) for ix, _ in chunk))
            hist = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, (ix, _) in enumerate(chunk):
                if ix:
                    hist[row, -len(ix) :] = torch.tensor(ix)
            hist = hist.to(self.device)
            scores = self.model.score_all_items(hist, self.cache).float()  # (B, N+1)
            # A broken (NaN, inf) score ranks after every real one but before what is never recommended.
            rank_last_if_not_finite(scores, floor=torch.finfo(scores.dtype).min)
            scores.scatter_(1, hist, float("-inf"))  # never recommend the history (or padding)
            scores[:, 0] = float("-inf")
            top = min(max(ks[s : s + batch_size]), self.n_items)
            values, indices = scores.topk(top, dim=1)
            for row, (ix, unknown) in enumerate(chunk):
                kk = min(ks[s + row], self.n_items - len(set(ix)))
                out.append(Recommendation([self.item_ids[j] for j in indices[row, :kk].tolist()],
                                          [round(float(v), 6) for v in values[row, :kk].tolist()], unknown))
        return out
