"""prepare-data: readers, k-core, indexing, the leave-one-out split and negative sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from e4srec import contracts as c
from e4srec import data as d
from e4srec.stages import prepare_data
from helpers import DATA


def test_beauty_counts_match_the_paper(tmp_path: Path) -> None:
    metrics = prepare_data.run(prepare_data.PrepareDataConfig(), DATA / "Beauty.txt", tmp_path / "out")
    assert (metrics["data/users"], metrics["data/items"], metrics["data/interactions"]) == (22363, 12101, 198502)
    data = c.load_sequence_data(tmp_path / "out")
    # S3-Rec item ids are already 1..N, so indices equal the original ids.
    assert data.item_ids[1:5].tolist() == ["1", "2", "3", "4"]
    assert data.sequence(0).tolist() == [1, 2, 3, 4, 5]  # line 1 of Beauty.txt: "1 1 2 3 4 5"


def test_split_is_leave_one_out_and_cut(tmp_path: Path) -> None:
    raw = tmp_path / "toy.txt"
    raw.write_text("7 10 11 12 13 14 15\n8 20 21 22\n9 30 31 32 33\n")
    prepare_data.run(prepare_data.PrepareDataConfig(max_len=3, n_negatives=2), raw, tmp_path / "out")
    data = c.load_sequence_data(tmp_path / "out")
    index = {item: i for i, item in enumerate(data.item_ids)}
    ix = lambda *items: [index[str(i)] for i in items]  # noqa: E731
    assert data.user_ids.tolist() == ["7", "8", "9"]
    hist, targets = data.split("test")
    assert targets.tolist() == ix(15, 22, 33)
    assert hist[0].tolist() == ix(12, 13, 14)  # cut to the last max_len=3 items
    assert hist[1].tolist() == [0] + ix(20, 21)  # left-padded
    hist, targets = data.split("valid")
    assert targets.tolist() == ix(14, 21, 32)
    assert hist[0].tolist() == ix(11, 12, 13)
    assert hist[1].tolist() == [0, 0] + ix(20)
    train = data.train_matrix()  # items[:-2], max_len + 1 wide
    assert train.shape == (3, 4)
    assert train[0].tolist() == ix(10, 11, 12, 13)
    assert train[1].tolist() == [0, 0, 0] + ix(20)


def test_negatives_exclude_positives_and_are_seeded(prepared: Path) -> None:
    data = c.load_sequence_data(prepared)
    assert data.negatives.shape == (data.n_users, 99)
    for u in range(data.n_users):
        negs = data.negatives[u]
        assert len(set(negs.tolist())) == 99
        assert not set(negs.tolist()) & set(data.sequence(u).tolist())
    seqs = [data.sequence(u) for u in range(data.n_users)]
    again = d.sample_negatives(seqs, data.n_items, 99, seed=42)
    np.testing.assert_array_equal(again, data.negatives)
    other = d.sample_negatives(seqs, data.n_items, 99, seed=7)
    assert (other != data.negatives).mean() > 0.9


def test_prepare_data_is_reproducible(beauty_slice: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        prepare_data.run(prepare_data.PrepareDataConfig(), beauty_slice, tmp_path / name)
    for f in (c.SEQUENCES, c.ITEM_MAP, c.NEGATIVES, c.MANIFEST):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_interactions_table_with_string_ids_and_timestamps(tmp_path: Path) -> None:
    rows = [  # out of order on purpose: the reader sorts by (user, timestamp)
        ("bob", "sku-b", "2024-01-03"), ("alice", "sku-c", "2024-01-02"), ("alice", "sku-a", "2024-01-01"),
        ("bob", "sku-a", "2024-01-01"), ("alice", "sku-b", "2024-01-05"), ("bob", "sku-c", "2024-01-09"),
        ("carol", "sku-a", "2024-02-01"), ("carol", "sku-b", "2024-02-02"),  # too short: dropped
    ]
    df = pd.DataFrame(rows, columns=["uid", "sku", "when"])
    for path in (tmp_path / "x.csv", tmp_path / "x.parquet"):
        df.to_csv(path, index=False) if path.suffix == ".csv" else df.to_parquet(path)
        out = tmp_path / f"out{path.suffix}"
        config = prepare_data.PrepareDataConfig(user_col="uid", item_col="sku", time_col="when", n_negatives=1)
        with pytest.raises(Exception, match="fewer than 1 remain"):
            prepare_data.run(config, path, out)  # 3 items, users touch all 3: no negative possible
        assert not out.exists()
    df = pd.concat([df, pd.DataFrame([("dave", "sku-d", "2024-03-01"), ("dave", "sku-e", "2024-03-02"),
                                      ("dave", "sku-f", "2024-03-03")], columns=df.columns)])
    df.to_parquet(tmp_path / "y.parquet")
    config = prepare_data.PrepareDataConfig(user_col="uid", item_col="sku", time_col="when", n_negatives=2)
    prepare_data.run(config, tmp_path / "y.parquet", tmp_path / "y")
    data = c.load_sequence_data(tmp_path / "y")
    assert data.user_ids.tolist() == ["alice", "bob", "dave"]
    assert data.manifest["dropped"]["users_with_fewer_than_3"] == 1
    assert [data.item_ids[i] for i in data.sequence(0)] == ["sku-a", "sku-c", "sku-b"]
    assert [data.item_ids[i] for i in data.sequence(1)] == ["sku-a", "sku-b", "sku-c"]


def test_k_core_filters_iteratively() -> None:
    df = pd.DataFrame({
        "user_id": ["u1"] * 3 + ["u2"] * 3 + ["u3"] * 2,
        "item_id": ["a", "b", "c", "a", "b", "c", "a", "z"],
        "order": range(8),
    })
    out = d.k_core(df, 2)  # z has 1 -> dropped, then u3 has 1 -> dropped
    assert sorted(out["user_id"].unique()) == ["u1", "u2"]
    assert sorted(out["item_id"].unique()) == ["a", "b", "c"]
    assert d.k_core(df, 0).equals(df)


def test_item_map_hash_changes_with_the_items() -> None:
    assert c.item_map_hash(["1", "2"]) == c.item_map_hash(["1", "2"])
    assert c.item_map_hash(["1", "2"]) != c.item_map_hash(["2", "1"])
    assert c.item_map_hash(["1", "2"]) != c.item_map_hash(["1", "2", "3"])
