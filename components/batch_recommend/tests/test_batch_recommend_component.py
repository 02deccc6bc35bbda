"""batch-recommend: every user gets k unseen items with their original ids."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from e4srec import contracts as c
from e4srec.errors import E4SRecError
from e4srec.stages import batch_recommend as stage
from e4srec.stages import train_e4srec


@pytest.fixture(scope="module")
def model(prepared: Path, sasrec_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("batch") / "model"
    train_e4srec.run(train_e4srec.TrainE4SRecConfig(device="cpu", max_examples=64, eval_users=20), prepared,
                     sasrec_dir, "tiny", out, progress=False)
    return out


def test_top_k_for_every_user(model: Path, prepared: Path, tmp_path: Path) -> None:
    metrics = stage.run(stage.BatchRecommendConfig(k=7, max_users=120, device="cpu"), model, prepared,
                        tmp_path / "out", progress=False)
    df = pd.read_parquet(tmp_path / "out" / stage.OUTPUT)
    data = c.load_sequence_data(prepared)
    assert metrics["batch/users"] == len(df) == 120
    assert df["user_id"].tolist() == [str(u) for u in data.user_ids[:120]]
    for u, row in df.iterrows():
        assert len(row["items"]) == 7 and list(row["scores"]) == sorted(row["scores"], reverse=True)
        assert not set(row["items"]) & {str(data.item_ids[i]) for i in data.sequence(u)}


def test_other_data_is_refused(model: Path, tmp_path: Path, beauty_slice: Path) -> None:
    from e4srec.stages import prepare_data

    lines = beauty_slice.read_text().splitlines()[:200]
    (tmp_path / "small.txt").write_text("\n".join(lines) + "\n")
    prepare_data.run(prepare_data.PrepareDataConfig(), tmp_path / "small.txt", tmp_path / "small")
    with pytest.raises(E4SRecError, match="another item map"):
        stage.run(stage.BatchRecommendConfig(device="cpu"), model, tmp_path / "small", tmp_path / "x")
