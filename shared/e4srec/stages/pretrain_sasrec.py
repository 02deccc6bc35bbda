"""Stage pretrain-sasrec: train SASRec on the leave-one-out split, export its item embeddings.

Output folder:
  model.safetensors            SASRec weights
  config.json                  {"model": SASRecConfig, "train": PretrainSasrecConfig, item_map_sha256, ...}
  item_embeddings.safetensors  tensor `item_embeddings` (N+1, dim), row 0 = padding (zeros); the
                               header metadata carries item_map_sha256, n_items and dim
  item_map.parquet             the data's item map, so the embeddings travel with their ids
  metrics.json                 valid/* and test/* metrics of the best epoch, full and sampled
  metrics_by_length.json       the same per history-length group
  training_log.json            per-epoch loss, time and validation metrics
  *.png                        training curves, test metrics by history length
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from e4srec import config as cfg
from e4srec import contracts as c
from e4srec import sasrec
from e4srec.device import resolve_device, reuse_freed_memory
from e4srec.errors import E4SRecError
from e4srec.evaluate import evaluate
from e4srec.outputs import preflight, staged_output
from e4srec.progress import progress as progress_bar
from e4srec.sasrec import SASRec, SASRecConfig
from e4srec.settings import PretrainSasrecConfig
from e4srec.storage import fetch
from e4srec.tracking import Tracker, figure_to_artifact, tracked

STAGE = sasrec.WRITER
EARLY_STOP_METRIC = "valid/full/NDCG@10"


class Batches:
    """Training batches over the (U, L+1) left-padded matrix, trimmed to each batch's longest row."""

    def __init__(self, matrix: np.ndarray, n_items: int, config: PretrainSasrecConfig, device: torch.device) -> None:
        self.matrix = torch.as_tensor(matrix)
        self.lengths = (self.matrix > 0).sum(1).numpy()
        self.users = np.flatnonzero(self.lengths >= 2)  # need one input and one target
        self.n_items = n_items
        self.config = config
        self.device = device
        self.rng = np.random.default_rng(config.seed)
        self.gen = torch.Generator(device=device).manual_seed(config.seed)
        if config.loss == "bce":  # a user who touched every item leaves no negative to draw
            ordered = np.sort(matrix, axis=1)
            distinct = ((ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] > 0)).sum(1) + (ordered[:, 0] > 0)
            full = np.flatnonzero(distinct >= n_items)
            if len(full):
                raise E4SRecError(f"{c.SEQUENCES} row {int(full[0])}: the user's training history holds all "
                                  f"{n_items} items, so BCE has no negative item to sample ({len(full)} such users); "
                                  f"use --loss ce or a dataset with more items")

    def __len__(self) -> int:
        return -(-len(self.users) // self.config.batch_size)

    def __iter__(self):  # noqa: ANN204 (yields tuples of tensors)
        perm = self.rng.permutation(self.users)
        if self.config.bucket_by_length:
            # Sort a random permutation by length (stable): equal lengths stay shuffled, batches
            # barely need padding, and the batch order is shuffled below.
            perm = perm[np.argsort(self.lengths[perm], kind="stable")]
        chunks = [perm[i : i + self.config.batch_size] for i in range(0, len(perm), self.config.batch_size)]
        for j in self.rng.permutation(len(chunks)):
            rows = chunks[j]
            width = int(self.lengths[rows].max())
            block = self.matrix[rows, -width:].to(self.device)  # (B, T+1)
            inputs, targets = block[:, :-1], block[:, 1:]  # (B, T) each
            negatives = self._negatives(block, targets.shape) if self.config.loss == "bce" else None
            yield inputs, targets, negatives

    def _negatives(self, block: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """One item per position that the user's training sequence does not contain (resampled)."""
        seen = torch.zeros(block.shape[0], self.n_items + 1, dtype=torch.bool, device=self.device)
        seen.scatter_(1, block, True)  # (B, N+1); column 0 gets set by padding, never drawn anyway
        neg = torch.randint(1, self.n_items + 1, shape, generator=self.gen, device=self.device)
        clash = seen.gather(1, neg)
        while clash.any():
            neg[clash] = torch.randint(1, self.n_items + 1, (int(clash.sum()),), generator=self.gen, device=self.device)
            clash = seen.gather(1, neg)
        return neg


def train(config: PretrainSasrecConfig, data: c.SequenceData, tracker: Tracker | None = None,
          progress: bool = True) -> tuple[SASRec, list[dict[str, Any]], int]:
    """Train with early stopping on validation NDCG@10; return (best model, log, best epoch)."""
    tracker = tracker or Tracker(None)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model_config = SASRecConfig(n_items=data.n_items, dim=config.dim, n_blocks=config.n_blocks,
                                n_heads=config.n_heads, max_len=data.max_len, dropout=config.dropout,
                                loss=config.loss, arch=config.arch)
    model = SASRec(model_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.98),
                                 weight_decay=config.weight_decay)
    batches = Batches(data.train_matrix(), data.n_items, config, device)
    log: list[dict[str, Any]] = []
    best, best_epoch, best_state, waited = -1.0, 0, copy.deepcopy(model.state_dict()), 0
    with reuse_freed_memory(device.type == "cpu"):  # CE epochs 1.7x faster on a 2-core VM
        bar = progress_bar(range(1, config.epochs + 1), desc=STAGE, unit="epoch", disable=not progress,
                           mininterval=5)
        for epoch in bar:
            model.train()
            t0, total, count = time.perf_counter(), 0.0, 0
            for inputs, targets, negatives in batches:
                loss = model.loss(inputs, targets, negatives)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total + loss.item(), count + 1
            row: dict[str, Any] = {"epoch": epoch, "train/loss": total / count,
                                   "train/seconds": time.perf_counter() - t0}
            if epoch % config.eval_every == 0 or epoch == config.epochs:
                model.eval()
                result = evaluate(model.score_all_items, data, "valid", batch_size=config.eval_batch_size,
                                  device=device, progress=False)
                row.update(result.metrics())
                if row[EARLY_STOP_METRIC] > best:
                    best, best_epoch, waited = row[EARLY_STOP_METRIC], epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    waited += 1
            log.append(row)
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            bar.set_postfix(loss=f"{row['train/loss']:.4f}", ndcg10=f"{best:.4f}", best_epoch=best_epoch,
                            refresh=False)
            if waited >= config.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return model, log, best_epoch


def check(config: PretrainSasrecConfig, data_dir: Path | str, output: Path | str, overwrite: bool = False) -> None:
    """Refuse, before any work, an output that is not free or that overlaps the input."""
    preflight(output, overwrite, {"--data": data_dir})


def run(config: PretrainSasrecConfig, data_dir: Path | str, output: Path | str, *, overwrite: bool = False,
        tracker: Tracker | None = None, progress: bool = True) -> dict[str, float]:
    """Train on `data_dir` (a prepare-data output), write the stage's artifacts to `output`."""
    tracker = tracker or Tracker(None)
    check(config, data_dir, output, overwrite)
    data = c.load_sequence_data(fetch(data_dir))
    with staged_output(output, overwrite) as out:
        tracker.log_params(cfg.to_dict(config))
        tracker.log_params({"item_map_sha256": data.item_map_sha256, "max_len": data.max_len})
        t0 = time.perf_counter()
        model, log, best_epoch = train(config, data, tracker, progress)
        device = next(model.parameters()).device
        results = [evaluate(model.score_all_items, data, split, batch_size=config.eval_batch_size, device=device,
                            progress=progress) for split in c.SPLITS]
        metrics: dict[str, float] = {k: v for r in results for k, v in r.metrics().items()}
        metrics |= {
            "train/best_epoch": float(best_epoch),
            "train/epochs": float(len(log)),
            "train/seconds": time.perf_counter() - t0,
            "train/seconds_per_epoch": float(np.mean([r["train/seconds"] for r in log])),
        }
        by_length = {r.split: r.by_length() for r in results}

        sasrec.save_model(out, model.cpu(), data.item_map_sha256, {
            "train": cfg.to_dict(config), "best_epoch": best_epoch,
            "data": {k: data.manifest[k] for k in ("n_users", "n_items", "n_interactions", "input")},
        })
        shutil.copyfile(data.root / c.ITEM_MAP, out / c.ITEM_MAP)
        c.write_json(out / c.METRICS, metrics)
        c.write_json(out / "metrics_by_length.json", by_length)
        (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")

        # At the last epoch's step: MLflow shows a metric's value at its largest step, so valid/* in the
        # runs table is the best epoch's (the model kept), not the last epoch's.
        tracker.log_metrics(metrics, step=len(log))
        from e4srec import (
            plots,  # matplotlib only where plots are made (GPU benches lack it)
        )

        figure_to_artifact(tracker, plots.training_curves(log, EARLY_STOP_METRIC), "training_curves.png", out)
        figure_to_artifact(tracker, plots.metrics_by_length(by_length["test"], title="SASRec test"),
                           "metrics_by_length.png", out)
        for name in (sasrec.CONFIG, c.METRICS, "metrics_by_length.json", "training_log.json"):
            tracker.log_artifact(out / name)
    return metrics


run_tracked = tracked(STAGE, check)(run)
