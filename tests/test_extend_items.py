"""extend-items: old items keep their scores exactly, new items are rankable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from e4srec import contracts as c
from e4srec import e4srec as e4srec_model
from e4srec import sasrec as sasrec_model
from e4srec.extend import fit_head_rows
from e4srec.stages import train_e4srec as stage
from helpers import e4srec
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def trained(prepared: Path, sasrec_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e4srec") / "model"
    config = stage.TrainE4SRecConfig(batch_size=32, lr=3e-3, device="cpu", max_examples=1500, eval_users=100)
    stage.run(config, prepared, sasrec_dir, "tiny", out, progress=False)
    return out


def test_old_scores_unchanged_and_new_items_rankable(trained: Path, prepared: Path, tmp_path: Path) -> None:
    table = sasrec_model.load_item_embeddings(trained, c.read_json(trained / "config.json")["item_map_sha256"])
    n = table.shape[0] - 1
    clone = table[5].numpy()  # a new item that looks exactly like item 5 in SASRec space
    rng = np.random.default_rng(0)
    pd.DataFrame({"item_id": ["new-a", "new-b"],
                  "embedding": [clone.tolist(), rng.normal(0, float(table[1:].std()), 64).tolist()]}
                 ).to_parquet(tmp_path / "new.parquet")
    result = e4srec("extend-items", "--model", trained, "--new-items", tmp_path / "new.parquet",
                    "--output", tmp_path / "extended")
    assert result.returncode == 0, result.stderr
    before, after = e4srec_model.load_model(trained), e4srec_model.load_model(tmp_path / "extended")
    data = c.load_sequence_data(prepared)
    hist = torch.as_tensor(data.split("test")[0][:64, -20:])
    s0 = before.score_all_items(hist, before.prefix_cache())
    s1 = after.score_all_items(hist, after.prefix_cache())
    assert s1.shape == (64, n + 3)
    torch.testing.assert_close(s1[:, : n + 1], s0)  # every old item scores exactly as before
    assert torch.isfinite(s1[:, n + 1 :]).all()
    # the new head rows are the ridge map, fitted on the trained items, applied to the new embeddings
    head = load_file(str(trained / e4srec_model.HEAD))["head.weight"]
    expected = fit_head_rows(table[1:], head[1:], table[5:6])
    torch.testing.assert_close(after.head.weight[n + 1 : n + 2].detach(), expected)
    with_new = after.score_all_items(torch.tensor([[3, n + 1, n + 2]]), after.prefix_cache())
    assert torch.isfinite(with_new[:, 1:]).all()  # new items can appear in histories too
    meta = c.read_json(tmp_path / "extended" / "config.json")
    assert meta["model"]["n_items"] == n + 2 and meta["extended_from"]["added"] == 2
    ids = pd.read_parquet(tmp_path / "extended" / c.ITEM_MAP)["item_id"].tolist()
    assert ids[-2:] == ["new-a", "new-b"] and meta["item_map_sha256"] == c.item_map_hash(ids)
    assert (tmp_path / "extended" / "adapter" / "adapter_model.safetensors").read_bytes() == (
        trained / "adapter" / "adapter_model.safetensors").read_bytes()


def test_bad_new_items(trained: Path, tmp_path: Path) -> None:
    pd.DataFrame({"item_id": ["1"], "embedding": [[0.0] * 64]}).to_parquet(tmp_path / "dup.parquet")
    result = e4srec("extend-items", "--model", trained, "--new-items", tmp_path / "dup.parquet", "--output",
                    tmp_path / "x")
    assert result.returncode == 1 and "dup.parquet row 0: item '1' is already in the model" in result.stderr
    pd.DataFrame({"item_id": ["z"], "embedding": [[0.0] * 3]}).to_parquet(tmp_path / "short.parquet")
    result = e4srec("extend-items", "--model", trained, "--new-items", tmp_path / "short.parquet", "--output",
                    tmp_path / "y")
    assert result.returncode == 1 and "embedding of length 3, expected a list of 64 numbers" in result.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_ridge_head_rows_recover_a_linear_relation() -> None:
    # Where head rows follow the embeddings linearly (what training pushes them towards), a new item's
    # row is that relation's prediction: here within 2% of the true row, noise included.
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(2000, 64, generator=gen)
    M, b = torch.randn(64, 32, generator=gen), torch.randn(32, generator=gen)
    head = emb @ M + b + 0.05 * torch.randn(2000, 32, generator=gen)
    new = torch.randn(3, 64, generator=gen)
    fitted = fit_head_rows(emb, head, new, ridge=1e-4)
    truth = new @ M + b
    assert ((fitted - truth).norm(dim=1) / truth.norm(dim=1)).max() < 0.02
