"""The one evaluator: full ranking with the history masked, and the sampled 99-negative ranking.

Every model hands it the same scoring method, `score_all_items(histories) -> (B, N+1)`, so SASRec,
E4SRec and anything later are measured by one piece of code. Ranks are 0-based and pessimistic on
ties (an item scoring exactly like the target counts as ranked above it), so a model that scores
everything the same gets the worst rank, not the best.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from e4srec.contracts import KS_HR, KS_NDCG, METRIC_NAMES, PROTOCOLS, SequenceData
from e4srec.progress import progress as bar

# History-length groups as in the E4SRec paper's Fig. 4: edges are group starts.
DEFAULT_LENGTH_EDGES = (1, 5, 10, 20, 50)

Scorer = Callable[[torch.Tensor], torch.Tensor]

# On CPU, glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free, so a
# score matrix that size is faulted in again page by page on every batch: at 1,024 Beauty users
# (50 MB) that put a quarter of a 2-core VM's CPU time in the kernel. Batches on CPU are cut to keep
# each (B, N+1) fp32 matrix under this many bytes; ranks do not depend on the batch.
CPU_SCORE_BYTES = 16 * 2**20


def cpu_batch_size(batch_size: int, n_items: int, device: torch.device | str) -> int:
    """`batch_size`, cut on CPU to the users whose fp32 scores over n_items + 1 fit CPU_SCORE_BYTES."""
    if torch.device(device).type != "cpu":
        return batch_size
    return max(1, min(batch_size, CPU_SCORE_BYTES // (4 * (n_items + 1))))


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """HR@k, NDCG@k and MRR from 0-based target ranks (one target per user, so IDCG = 1)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        return {m: float("nan") for m in METRIC_NAMES}
    out = {f"HR@{k}": float(np.mean(ranks < k)) for k in KS_HR}
    gain = 1.0 / np.log2(ranks + 2.0)
    out.update({f"NDCG@{k}": float(np.mean(np.where(ranks < k, gain, 0.0))) for k in KS_NDCG})
    out["MRR"] = float(np.mean(1.0 / (ranks + 1.0)))
    return {m: out[m] for m in METRIC_NAMES}


def rank_last_if_not_finite(scores: torch.Tensor, floor: float = float("-inf")) -> torch.Tensor:
    """Scores with NaN and +-inf set to `floor`, in place: a broken score ranks last, never as a hit.

    Without this a NaN target would compare false with everything and rank first (HR@10 1.0, NDCG inf).
    `recommend` passes the dtype's lowest finite value, keeping -inf for what is never recommended.
    """
    return scores.masked_fill_(~torch.isfinite(scores), floor)


def full_ranks(scores: torch.Tensor, seen: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Rank of each target among all N items, with the items the user already saw masked.

    scores (B, N+1), overwritten in place; seen = (rows, cols), the (user-in-batch, item) pairs of
    each user's whole history before the target (not only the cut part a model reads); targets (B,).
    Column 0 (padding) is masked too. A target that repeats an item of the history is never masked
    itself: that would make it unrankable.
    """
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    scores.index_put_(seen, torch.tensor(float("-inf"), device=scores.device))
    scores[:, 0] = float("-inf")
    scores.scatter_(1, targets[:, None], target_scores)
    return (scores >= target_scores).sum(1) - 1  # ties count against the target; minus itself


def history_pairs(data: SequenceData, users: np.ndarray, drop: int) -> tuple[np.ndarray, np.ndarray]:
    """(row in batch, item) for every item of each user's sequence except the last `drop` ones."""
    starts = data.offsets[users]
    lengths = data.offsets[users + 1] - drop - starts
    rows = np.repeat(np.arange(len(users)), lengths)
    first = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return rows, data.values[first + np.arange(lengths.sum())]


def sampled_ranks(scores: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Rank of each target among itself and its sampled negatives (B, K): 0..K."""
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    neg_scores = scores.gather(1, negatives)  # (B, K)
    return (neg_scores >= target_scores).sum(1)


def length_group_labels(edges: Sequence[int]) -> list[str]:
    """Labels like '1-4', '5-9', ..., '50+' for group starts (1, 5, ..., 50)."""
    labels = [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])]
    return labels + [f"{edges[-1]}+"]


@dataclass
class EvalResult:
    """Target ranks per protocol for one split, with the history length of each user."""

    split: str
    ranks: dict[str, np.ndarray]  # protocol -> (U,) 0-based ranks
    history_lengths: np.ndarray  # (U,) items in the whole history before the target (not cut)

    def metrics(self) -> dict[str, float]:
        """Flat `<split>/<protocol>/<metric>` keys, the metrics.json contract."""
        return {
            f"{self.split}/{protocol}/{name}": value
            for protocol, ranks in self.ranks.items()
            for name, value in metrics_from_ranks(ranks).items()
        }

    def by_length(self, edges: Sequence[int] = DEFAULT_LENGTH_EDGES) -> dict[str, dict[str, dict[str, float]]]:
        """{protocol: {group label: {'users': n, metric: value}}} over history-length groups."""
        group = np.searchsorted(np.asarray(edges), self.history_lengths, side="right") - 1
        out: dict[str, dict[str, dict[str, float]]] = {}
        for protocol, ranks in self.ranks.items():
            out[protocol] = {}
            for g, label in enumerate(length_group_labels(edges)):
                sel = group == g
                out[protocol][label] = {"users": int(sel.sum()), **metrics_from_ranks(ranks[sel])}
        return out


@torch.no_grad()
def evaluate(
    score_all_items: Scorer,
    data: SequenceData,
    split: str,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    users: np.ndarray | None = None,
    progress: bool = True,
) -> EvalResult:
    """Score every user of `split` once and rank the target under both protocols.

    `score_all_items` gets a left-padded (B, L) LongTensor of item indices on `device` and returns
    (B, N+1) scores. Users are scored in order of history length and batches are trimmed to their
    longest history, so short histories cost short forwards; ranks come back in user order. On CPU
    a batch holds at most as many users as `cpu_batch_size` allows.
    """
    batch_size = cpu_batch_size(batch_size, data.n_items, device)
    histories, targets = data.split(split)
    users = np.arange(data.n_users) if users is None else np.asarray(users)
    histories, targets, negatives = histories[users], targets[users], data.negatives[users]
    drop = 2 if split == "valid" else 1
    lengths = (histories > 0).sum(1)  # what the model reads, for trimming batches
    full_lengths = data.offsets[users + 1] - drop - data.offsets[users]  # for the length groups
    order = np.argsort(lengths, kind="stable")
    ranks = {p: np.empty(len(users), dtype=np.int64) for p in PROTOCOLS}
    starts = range(0, len(order), batch_size)
    for s in bar(starts, desc=f"evaluate {split}", unit="batch", disable=not progress, leave=False, mininterval=2):
        idx = order[s : s + batch_size]
        width = max(int(lengths[idx].max()), 1)
        hist = torch.as_tensor(histories[idx, -width:], device=device)
        tgt = torch.as_tensor(targets[idx], device=device)
        neg = torch.as_tensor(negatives[idx], device=device)
        rows, cols = history_pairs(data, users[idx], drop)
        seen = (torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device))
        scores = rank_last_if_not_finite(score_all_items(hist).float())
        ranks["sampled"][idx] = sampled_ranks(scores, tgt, neg).cpu().numpy()  # before masking
        ranks["full"][idx] = full_ranks(scores, seen, tgt).cpu().numpy()
    return EvalResult(split, ranks, full_lengths)


def format_table(models: dict[str, dict[str, float]], splits: Sequence[str] = ("valid", "test")) -> str:
    """Plain-text table: one row per (model, split, protocol), one column per metric."""
    header = f"{'model':<14}{'split':<7}{'protocol':<9}" + "".join(f"{m:>9}" for m in METRIC_NAMES)
    lines = [header, "-" * len(header)]
    for name, metrics in models.items():
        for split in splits:
            for protocol in PROTOCOLS:
                keys = [f"{split}/{protocol}/{m}" for m in METRIC_NAMES]
                if not all(k in metrics for k in keys):
                    continue
                lines.append(f"{name:<14}{split:<7}{protocol:<9}" + "".join(f"{metrics[k]:>9.4f}" for k in keys))
    return "\n".join(lines)
