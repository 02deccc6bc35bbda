"""The evaluator against hand-computed cases."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from e4srec import contracts as c
from e4srec import evaluate as ev
from e4srec.evaluate import cpu_batch_size, evaluate, full_ranks, metrics_from_ranks, sampled_ranks

INF = float("-inf")


def test_metrics_from_ranks_by_hand() -> None:
    m = metrics_from_ranks(np.array([0, 3, 12]))  # 0-based ranks of three users' targets
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["HR@5"] == pytest.approx(2 / 3)
    assert m["HR@10"] == pytest.approx(2 / 3)
    assert m["HR@20"] == pytest.approx(1.0)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert m["NDCG@20"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(14)) / 3)
    assert m["MRR"] == pytest.approx((1 + 1 / 4 + 1 / 13) / 3)


def test_full_ranks_mask_history_padding_and_count_ties_against_the_target() -> None:
    # items 1..5; column 0 is padding
    scores = torch.tensor([
        [9.0, 1.0, 5.0, 4.0, 3.0, 2.0],  # target 3 (4.0); item 2 (5.0) is history -> masked: rank 0
        [0.0, 1.0, 5.0, 4.0, 3.0, 2.0],  # target 4 (3.0); no history: items 2, 3 above -> rank 2
        [0.0, 2.0, 2.0, 2.0, 2.0, 2.0],  # all tied, target 1: pessimistic -> rank 4
        [0.0, 1.0, 5.0, 4.0, 3.0, 2.0],  # target 2 repeats a history item: never masked itself -> rank 0
    ])
    seen = (torch.tensor([0, 3, 3]), torch.tensor([2, 2, 3]))  # user 0 saw item 2; user 3 saw 2 and 3
    targets = torch.tensor([3, 4, 1, 2])
    assert full_ranks(scores.clone(), seen, targets).tolist() == [0, 2, 4, 0]


def test_sampled_ranks() -> None:
    scores = torch.tensor([[0.0, 5.0, 1.0, 2.0, 6.0], [0.0, 1.0, 1.0, 1.0, 1.0]])
    targets = torch.tensor([1, 1])
    negatives = torch.tensor([[2, 3, 4], [2, 3, 4]])
    assert sampled_ranks(scores, targets, negatives).tolist() == [1, 3]  # 6 > 5; ties are pessimistic


def test_evaluate_oracle_and_constant_scorers(prepared: Path) -> None:
    data = c.load_sequence_data(prepared)
    hist, test_targets = data.split("test")
    calls = []

    def constant(hist: torch.Tensor) -> torch.Tensor:
        calls.append(hist.shape)
        return torch.zeros(hist.shape[0], data.n_items + 1)

    # A constant scorer ties everything: the worst rank under both protocols.
    result = evaluate(constant, data, "test", batch_size=128, progress=False)
    assert (result.ranks["sampled"] == 99).all()
    assert all(r >= data.n_items - 50 - 1 for r in result.ranks["full"][:5])  # all items but the masked ones
    assert result.metrics()["test/full/HR@20"] == 0.0
    assert max(w for _, w in calls) <= data.max_len and len(calls) == math.ceil(data.n_users / 128)

    # evaluate visits users shortest history first; replay that order to know who is in each batch
    visit = np.argsort((hist > 0).sum(1), kind="stable")
    batches = iter([visit[i : i + 128] for i in range(0, len(visit), 128)])

    def perfect(hist: torch.Tensor) -> torch.Tensor:
        rows = next(batches)
        s = torch.zeros(hist.shape[0], data.n_items + 1)
        s[torch.arange(len(rows)), torch.as_tensor(test_targets[rows])] = 1.0
        return s

    result = evaluate(perfect, data, "test", batch_size=128, progress=False)
    m = result.metrics()
    assert m["test/full/HR@1"] == 1.0 and m["test/sampled/NDCG@5"] == 1.0 and m["test/full/MRR"] == 1.0
    groups = result.by_length()
    assert sum(g["users"] for g in groups["full"].values()) == data.n_users
    assert all(g["HR@1"] == 1.0 for g in groups["full"].values() if g["users"])
    assert set(m) == {f"test/{p}/{k}" for p in ("full", "sampled") for k in
                      ("HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR")}


def test_cpu_batches_keep_scores_under_the_mmap_threshold_and_rank_the_same(prepared: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu_batch_size(1024, 12101, "cpu") == 346  # Beauty: 346 x 12,102 fp32 scores < 16 MiB
    assert cpu_batch_size(1024, 12101, "cuda") == 1024  # GPU memory is not glibc's: batches stay
    assert cpu_batch_size(64, 12101, "cpu") == 64 and cpu_batch_size(8, 10**8, "cpu") == 1
    data = c.load_sequence_data(prepared)
    item_score = torch.randn(data.n_items + 1, generator=torch.Generator().manual_seed(0))
    rows = []

    def scorer(hist: torch.Tensor) -> torch.Tensor:  # depends on the history, so batches must line up
        rows.append(hist.shape[0])
        return item_score + 0.1 * (hist.sum(1, keepdim=True) % 7).float() * item_score.roll(1)

    monkeypatch.setattr(ev, "CPU_SCORE_BYTES", 2**40)  # no cut: one batch of everyone
    whole = evaluate(scorer, data, "test", batch_size=data.n_users, progress=False)
    assert rows == [data.n_users]
    monkeypatch.setattr(ev, "CPU_SCORE_BYTES", 4 * (data.n_items + 1) * 10)  # room for 10 users
    rows.clear()
    cut = evaluate(scorer, data, "test", batch_size=data.n_users, progress=False)
    assert max(rows) == 10 and sum(rows) == data.n_users
    for protocol in ("full", "sampled"):
        assert (cut.ranks[protocol] == whole.ranks[protocol]).all()
