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
import torch

from e4srec.errors import E4SRecError
from e4srec.evaluate import rank_last_if_not_finite


@dataclass
class Recommendation:
    items: list[str]
    scores: list[float]
    unknown_items: list[str] = field(default_factory=list)


def check_ks(ks: list) -> list:
    """`ks` unchanged when every k is a positive integer; else a one-line error naming the request."""
    for i, value in enumerate(ks):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise E4SRecError(f"request {i}: k={value!r}; k must be a positive integer")
    return ks


class Recommender:
    """A trained E4SRec or SASRec plus its item map (an E4SRec scores with its instruction prefix cached once
    and its LoRA adapter merged into the backbone: see `trained.load`)."""

    def __init__(self, model_dir: Path | str, device: str = "cpu", dtype: str | None = None,
                 backbone: str | None = None) -> None:
        from e4srec import trained
        from e4srec.storage import fetch

        self.model_dir = Path(fetch(model_dir))
        self.model = trained.load(self.model_dir, device, dtype, backbone, merge_adapter=True)
        self.device = torch.device(device)
        self.item_ids = self.model.item_ids
        self.index = {item: i for i, item in enumerate(self.item_ids) if i}
        self.max_len = self.model.max_len

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
        """Top-k per history, in request order; `k` per request or one for all.

        Histories are scored in batches of similar length (`length_batches`), each padded to its longest
        history. An E4SRec packs small batches of different lengths (a server's concurrent requests)
        into one sequence instead, so that they share one forward pass with no padding (`plan_batches`).
        """
        ks = check_ks([k] * len(histories) if isinstance(k, int) else list(k))
        encoded = [self.encode(list(h)) for h in histories]
        out: list[Recommendation | None] = [None] * len(encoded)
        lengths = [len(ix) for ix, _ in encoded]
        for rows, pack in plan_batches(lengths, batch_size, packing=self.model.score_packed is not None):
            packed = self.model.score_packed if pack else None
            width = max(1, max(len(encoded[r][0]) for r in rows))
            hist = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                if encoded[r][0]:
                    hist[i, -len(encoded[r][0]) :] = torch.tensor(encoded[r][0])
            hist = hist.to(self.device)
            scores = (packed([encoded[r][0] for r in rows]) if packed else self.model.score(hist)).float()  # (B, N+1)
            # A broken (NaN, inf) score ranks after every real one but before what is never recommended.
            rank_last_if_not_finite(scores, floor=torch.finfo(scores.dtype).min)
            scores.scatter_(1, hist, float("-inf"))  # never recommend the history (or padding)
            scores[:, 0] = float("-inf")
            top = min(max(ks[r] for r in rows), self.n_items)
            values, indices = scores.topk(top, dim=1)
            for i, r in enumerate(rows):
                ix, unknown = encoded[r]
                kk = min(ks[r], self.n_items - len(set(ix)))
                out[r] = Recommendation([self.item_ids[j] for j in indices[i, :kk].tolist()],
                                        [round(float(v), 6) for v in values[i, :kk].tolist()], unknown)
        return out  # type: ignore[return-value]


# A forward pass costs about as much as this many more history positions in a batch, whatever its size:
# it reads every weight once. SmolLM2 E4SRec in bf16 on 2 cores (bench/serving_batcher.py): 61 ms for one
# 3-item history, ~1 ms per (user, position) at 64 users x 50 items.
FORWARD_COST_POSITIONS = 32


# History items per packed forward pass: the linear layers see only these (and each user's response
# prefix); attention, which grows with the square of the packed length, stays a small part of the pass.
PACK_ITEMS = 512


def plan_batches(lengths: list[int], batch_size: int, packing: bool) -> list[tuple[list[int], bool]]:
    """(indices, packed) per forward pass: `length_batches`, then, with `packing`, consecutive batches
    merged while the merged one holds at most `batch_size` users and `PACK_ITEMS` history items; a
    merged batch is scored packed, one of similar lengths padded. Eight requests of lengths 1 to 50
    are one packed pass instead of several padded ones, each reading every weight; 64 histories of
    one length stay one padded pass."""
    plan: list[tuple[list[int], bool]] = []
    for rows in length_batches(lengths, batch_size):
        if packing and plan:
            last, _ = plan[-1]
            if (len(last) + len(rows) <= batch_size
                    and sum(lengths[i] for i in last) + sum(lengths[i] for i in rows) <= PACK_ITEMS):
                plan[-1] = (last + rows, True)
                continue
        plan.append((rows, False))
    return plan


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar history length, each at most `batch_size`.

    Sorted by length, a history joins the current batch unless widening the batch to it would pad
    the batch by more than a forward pass costs (`FORWARD_COST_POSITIONS`); then it starts a new one.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size:
            current = batches[-1]
            width = lengths[current[-1]]  # sorted: the batch's longest so far
            if len(current) * (lengths[i] - width) <= FORWARD_COST_POSITIONS:
                current.append(i)
                continue
        batches.append([i])
    return batches


class MicroBatcher:
    """Concurrent callers' requests scored together: what a server under load needs from one model.

    Callers (a server's request threads) hand their histories to `recommend` and wait; one worker
    thread scores everything that arrived while it was busy as one batch (at most `max_users`), so
    eight concurrent requests share one forward pass instead of contending for the same cores. The
    worker also waits up to `linger_s` for as many requests as were in flight at once since the
    previous batch began: clients that got their answers together come back a few milliseconds
    apart, and without the wait the first of them would take a pass of its own, the batches
    alternating 1, 7, 1, 7. A lone client never has two requests in flight, so it never waits. Each
    caller's `k` is checked before it joins a batch, so one bad request never fails the others.
    """

    def __init__(self, recommender: Recommender, max_users: int = 64, linger_s: float = 0.015) -> None:
        import queue
        import threading

        self.recommender, self.max_users, self.linger_s = recommender, max_users, linger_s
        self.pending: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.in_flight = 0  # callers inside recommend() now
        self.peak = 0  # the most at once since the current batch began
        threading.Thread(target=self._work, name="e4srec-batcher", daemon=True).start()

    def recommend(self, histories: list[list[str]], ks: list[int]) -> list[Recommendation]:
        from concurrent.futures import Future

        check_ks(ks)
        if len(histories) >= self.max_users:  # already a batch of its own
            return self.recommender.recommend(histories, ks, batch_size=self.max_users)
        future: Future = Future()
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            self.pending.put((histories, ks, future))
            return future.result()
        finally:
            with self.lock:
                self.in_flight -= 1

    def _work(self) -> None:
        import queue
        import time

        while True:
            jobs = [self.pending.get()]
            with self.lock:  # the concurrency seen during the previous batch; then count afresh
                expected, self.peak = self.peak, self.in_flight
            users = len(jobs[0][0])
            deadline = time.perf_counter() + self.linger_s
            while users < self.max_users:
                try:
                    wait = deadline - time.perf_counter() if len(jobs) < expected else 0.0
                    job = self.pending.get(timeout=wait) if wait > 0 else self.pending.get_nowait()
                except queue.Empty:
                    break
                jobs.append(job)
                users += len(job[0])
            histories = [h for job in jobs for h in job[0]]
            ks = [k for job in jobs for k in job[1]]
            try:
                results = self.recommender.recommend(histories, ks, batch_size=self.max_users)
            except BaseException as e:  # noqa: BLE001 (handed to every caller of the batch)
                for _, _, future in jobs:
                    future.set_exception(e)
                continue
            start = 0
            for job_histories, _, future in jobs:
                future.set_result(results[start : start + len(job_histories)])
                start += len(job_histories)
