"""SASRec: causality, padding invariance, training, negatives, artifacts."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from e4srec import contracts as c
from e4srec import sasrec as sasrec_model
from e4srec.errors import E4SRecError
from e4srec.sasrec import SASRec, SASRecConfig
from e4srec.stages import pretrain_sasrec as stage
from safetensors import safe_open


def model(**kw: object) -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(n_items=30, dim=16, max_len=8, dropout=0.0, **kw)).eval()


ARCHS = pytest.mark.parametrize("arch", ["kang", "s3rec"])


@ARCHS
def test_changing_a_later_item_leaves_earlier_outputs_unchanged(arch: str) -> None:
    m = model(n_heads=2, arch=arch)
    seq = torch.tensor([[0, 0, 3, 7, 1, 9, 4, 2]])
    base = m(seq)
    for t in range(2, 7):
        changed = seq.clone()
        changed[0, t + 1] = 25
        out = m(changed)
        torch.testing.assert_close(out[0, : t + 1], base[0, : t + 1])
        assert not torch.allclose(out[0, t + 1], base[0, t + 1])


@ARCHS
def test_trimmed_batch_equals_full_width_and_padding_is_inert(arch: str) -> None:
    m = model(arch=arch)
    full = torch.tensor([[0, 0, 0, 0, 0, 5, 6, 7], [0, 0, 0, 1, 2, 3, 4, 5]])
    trimmed = full[:, -5:]
    torch.testing.assert_close(m(full)[:, -5:], m(trimmed))
    torch.testing.assert_close(m.score_all_items(full), m.score_all_items(trimmed))
    assert torch.isfinite(m(full)).all()  # fully padded queries must not produce NaN
    assert torch.isneginf(m.score_all_items(full)[:, 0]).all()  # padding is never predicted


@pytest.mark.parametrize(("loss", "arch"), [("bce", "kang"), ("ce", "kang"), ("bce", "s3rec")])
def test_loss_falls_on_a_learnable_pattern(loss: str, arch: str) -> None:
    torch.manual_seed(0)
    m = SASRec(SASRecConfig(n_items=30, dim=16, max_len=8, dropout=0.0, loss=loss, arch=arch))
    seqs = torch.stack([torch.arange(s, s + 8) % 30 + 1 for s in range(20)])  # item i is followed by i+1
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        neg = torch.randint(1, 31, targets.shape)
        value = m.loss(inputs, targets, neg if loss == "bce" else None)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    assert losses[-1] < 0.5 * losses[0]
    top = m.eval().score_all_items(torch.tensor([[3, 4, 5, 6]])).argmax(1)
    assert top.item() == 7


def test_cpu_training_runs_inside_reuse_freed_memory(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    @contextlib.contextmanager
    def record(enabled: bool = True) -> Iterator[bool]:
        seen.append(enabled)
        yield enabled

    monkeypatch.setattr(stage, "reuse_freed_memory", record)
    stage.train(stage.PretrainSasrecConfig(epochs=1, device="cpu"), c.load_sequence_data(prepared), progress=False)
    assert seen == [True]


def test_bce_negatives_are_never_items_of_the_users_sequence(prepared: Path) -> None:
    data = c.load_sequence_data(prepared)
    config = stage.PretrainSasrecConfig(batch_size=64, device="cpu")
    batches = stage.Batches(data.train_matrix(), data.n_items, config, torch.device("cpu"))
    matrix = torch.as_tensor(data.train_matrix())
    seen_users = 0
    for inputs, targets, negatives in batches:
        assert inputs.shape == targets.shape == negatives.shape
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the next items
        block = torch.cat([inputs, targets[:, -1:]], 1)  # (B, T+1): the rows of the training matrix
        full = torch.zeros(len(block), matrix.shape[1], dtype=block.dtype)
        full[:, -block.shape[1] :] = block  # back to the full left-padded width
        for row, row_neg in zip(full, negatives):
            # a user with this exact sequence (identical sequences have identical item sets)
            user = int(np.flatnonzero((matrix == row).all(1))[0])
            assert not set(row_neg.tolist()) & set(matrix[user].tolist())
        seen_users += len(inputs)
    assert seen_users == len(batches.users) == data.n_users


def test_stage_artifacts_and_reload(prepared: Path, sasrec_dir: Path) -> None:
    data = c.load_sequence_data(prepared)
    meta = c.read_json(sasrec_dir / sasrec_model.CONFIG)
    assert meta["item_map_sha256"] == data.item_map_sha256
    with safe_open(str(sasrec_dir / sasrec_model.EMBEDDINGS), "pt") as f:
        assert f.metadata()["item_map_sha256"] == data.item_map_sha256
    emb = sasrec_model.load_item_embeddings(sasrec_dir, data.item_map_sha256)
    assert emb.shape == (data.n_items + 1, 64)
    assert torch.count_nonzero(emb[0]) == 0  # row 0 is padding
    assert (sasrec_dir / c.ITEM_MAP).read_bytes() == (prepared / c.ITEM_MAP).read_bytes()
    m = sasrec_model.load_model(sasrec_dir, data)
    torch.testing.assert_close(m.item_embeddings(), emb)
    metrics = c.read_json(sasrec_dir / c.METRICS)
    assert {"test/full/HR@10", "valid/sampled/NDCG@10", "train/best_epoch"} <= set(metrics)
    for png in ("training_curves.png", "metrics_by_length.png"):
        assert (sasrec_dir / png).stat().st_size > 1000
    with pytest.raises(E4SRecError, match="item-map hash"):
        sasrec_model.load_item_embeddings(sasrec_dir, "0" * 64)


def test_training_is_seeded(prepared: Path) -> None:
    data = c.load_sequence_data(prepared)
    config = stage.PretrainSasrecConfig(epochs=2, device="cpu")
    a, log_a, _ = stage.train(config, data, progress=False)
    b, log_b, _ = stage.train(config, data, progress=False)
    assert log_a[-1]["train/loss"] == log_b[-1]["train/loss"]
    torch.testing.assert_close(a.item_embeddings(), b.item_embeddings())


def test_early_stopping_keeps_the_best_epoch(prepared: Path) -> None:
    data = c.load_sequence_data(prepared)
    config = stage.PretrainSasrecConfig(epochs=6, patience=1, lr=0.05, device="cpu")
    m, log, best_epoch = stage.train(config, data, progress=False)
    scores = [r["valid/full/NDCG@10"] for r in log]
    assert best_epoch == 1 + int(np.argmax(scores))
    assert len(log) == 6 or scores[-1] <= max(scores[:-1])


def test_s3rec_arch_saves_and_reloads_and_old_configs_read_as_kang(prepared: Path, sasrec_dir: Path,
                                                                    tmp_path: Path) -> None:
    data = c.load_sequence_data(prepared)
    out = tmp_path / "s3rec"
    stage.run(stage.PretrainSasrecConfig(arch="s3rec", epochs=1, device="cpu"), prepared, out, progress=False)
    m = sasrec_model.load_model(out, data)
    assert m.config.arch == "s3rec" and isinstance(m.emb_norm, torch.nn.LayerNorm)
    history = torch.as_tensor(data.train_matrix()[:4, -data.max_len:])
    metrics = c.read_json(out / c.METRICS)
    assert 0 <= metrics["test/full/HR@10"] <= 1
    assert torch.isfinite(m.score_all_items(history)[:, 1:]).all()
    # A model saved before `arch` existed has no such key: it loads as the kang model it was.
    legacy_dir = tmp_path / "legacy"
    shutil.copytree(sasrec_dir, legacy_dir)
    legacy = c.read_json(legacy_dir / sasrec_model.CONFIG)
    legacy["model"].pop("arch")
    c.write_json(legacy_dir / sasrec_model.CONFIG, legacy)
    old = sasrec_model.load_model(legacy_dir, data)
    assert old.config.arch == "kang"
    torch.testing.assert_close(old.score_all_items(history), sasrec_model.load_model(sasrec_dir, data).score_all_items(history))
    with pytest.raises(E4SRecError, match="arch='bert'"):
        SASRecConfig(n_items=5, arch="bert")
