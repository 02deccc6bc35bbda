"""E4SRec: prompt layout, the prefix cache, the stage end to end on the tiny backbone, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from e4srec import contracts as c
from e4srec import e4srec as e4srec_model
from e4srec.backbones import BackboneOptions, load_backbone
from e4srec.e4srec import E4SRec, E4SRecConfig
from e4srec.errors import E4SRecError
from e4srec.evaluate import evaluate
from e4srec.prompt import recommendation_prefix
from e4srec.stages import prepare_data, pretrain_sasrec
from e4srec.stages import train_e4srec as stage


def tiny_model(n_items: int = 40, seed: int = 0) -> E4SRec:
    bb = load_backbone(BackboneOptions(backbone="tiny", dtype="fp32"))  # exact comparisons below
    torch.manual_seed(seed)
    table = torch.randn(n_items + 1, 64)
    table[0] = 0
    model = E4SRec(E4SRecConfig(n_items=n_items), bb.model.get_decoder(), bb.tokenizer, table,
                   recommendation_prefix(), "\n\n### Response:\n")
    for name, p in model.named_parameters():  # LoRA B starts at zero; make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model.eval()


HISTORIES = torch.tensor([[0, 0, 0, 5, 6], [1, 2, 3, 4, 5], [0, 0, 0, 0, 9], [0, 0, 0, 0, 0]])


def test_prefix_cache_gives_the_uncached_scores() -> None:
    model = tiny_model()
    plain = model.score_all_items(HISTORIES)
    cached = model.score_all_items(HISTORIES, model.prefix_cache())
    torch.testing.assert_close(cached[:, 1:], plain[:, 1:], atol=1e-5, rtol=1e-5)
    assert torch.isneginf(plain[:, 0]).all() and torch.isneginf(cached[:, 0]).all()  # padding never predicted


def test_packed_histories_give_the_padded_scores() -> None:
    """Histories of different lengths packed into one sequence (block-diagonal mask, positions
    restarting after the instruction) score as each does in a left-padded batch, an empty one too."""
    model = tiny_model()
    cache = model.prefix_cache()
    padded = model.score_all_items(HISTORIES, cache)
    lists = [[i for i in row.tolist() if i] for row in HISTORIES]
    assert [len(h) for h in lists] == [2, 5, 1, 0]
    packed = model.score_packed(lists, cache)
    torch.testing.assert_close(packed[:, 1:], padded[:, 1:], atol=1e-5, rtol=1e-5)
    assert torch.isneginf(packed[:, 0]).all()
    torch.testing.assert_close(model.score_packed(lists[1:2], cache), packed[1:2], atol=1e-5, rtol=1e-5)


def test_shared_prefix_training_gives_the_per_row_loss_and_gradients() -> None:
    model = tiny_model()
    model.train()
    for m in model.modules():  # LoRA dropout off: the one intended difference is its sampling
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    histories, targets = HISTORIES[:3], torch.tensor([7, 1, 30])
    grads = []
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        loss = model.loss(histories, targets, shared_prefix=shared)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.trainable_state().items()}))
    (plain_loss, plain), (shared_loss, shared) = grads
    torch.testing.assert_close(shared_loss, plain_loss, atol=1e-5, rtol=1e-5)
    assert plain.keys() == shared.keys() and any("lora_A" in n for n in plain)
    for name, g in plain.items():
        assert g.abs().sum() > 0, name  # the prefix's LoRA weights get gradients through the shared keys/values
        torch.testing.assert_close(shared[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_left_padding_makes_a_row_independent_of_its_batch() -> None:
    model = tiny_model()
    batched = model.score_all_items(HISTORIES)
    for i, row in enumerate(HISTORIES):
        alone = row[row > 0][None] if (row > 0).any() else row[-1:][None]
        torch.testing.assert_close(model.score_all_items(alone)[0, 1:], batched[i, 1:], atol=1e-5, rtol=1e-5)


def test_what_trains_and_what_is_frozen() -> None:
    model = tiny_model()
    trainable = set(model.trainable_state())
    assert trainable and all("lora_" in n or n.startswith(("proj.", "head.")) for n in trainable)
    assert {"proj.weight", "proj.bias", "head.weight"} <= trainable and model.head.bias is None
    assert not model.item_emb.weight.requires_grad


def test_empty_history_and_unknown_items() -> None:
    model = tiny_model()
    empty = model.score_all_items(torch.zeros(2, 3, dtype=torch.long), model.prefix_cache())
    assert torch.isfinite(empty[:, 1:]).all()  # documented: the prompt alone is scored
    torch.testing.assert_close(empty[0], empty[1])
    with pytest.raises(E4SRecError, match="history item index 41 is outside 1..40"):
        model.score_all_items(torch.tensor([[3, 41]]))


def test_examples_are_every_prefix_with_capped_targets_and_cut_histories(tmp_path: Path) -> None:
    raw = tmp_path / "toy.txt"
    raw.write_text("1 " + " ".join(str(i) for i in range(1, 10)) + "\n2 3 4 5 6\n3 10 11 12\n")
    prepare_data.run(prepare_data.PrepareDataConfig(max_len=3, n_negatives=1), raw, tmp_path / "d")
    data = c.load_sequence_data(tmp_path / "d")
    hist, tgt = data.prefix_examples(4)
    # user 1: train = items 1..7 -> targets 4..7 (the last 4), histories cut to 3; user 2: train = 3 4;
    # user 3: train = 10, no history to predict from
    assert tgt.tolist() == [4, 5, 6, 7, 4]
    assert hist.tolist() == [[1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6], [0, 0, 3]]


def test_stage_end_to_end_on_a_beauty_slice(prepared: Path, sasrec_dir: Path, tmp_path: Path) -> None:
    config = stage.TrainE4SRecConfig(batch_size=32, lr=2e-3, device="cpu", max_examples=1500)
    metrics = stage.run(config, prepared, sasrec_dir, "tiny", tmp_path / "e4srec", progress=False)
    out = tmp_path / "e4srec"
    assert metrics["train/loss_last"] < metrics["train/loss_first"]
    assert {"test/full/HR@10", "valid/sampled/NDCG@10", "eval/users_per_second"} <= set(metrics)
    assert c.read_json(out / e4srec_model.CONFIG)["backbone"]["backbone"] == "tiny"
    data = c.load_sequence_data(prepared)
    reloaded = e4srec_model.load_model(out)
    hist = torch.as_tensor(data.split("test")[0][:8, -10:])
    first = reloaded.score_all_items(hist, reloaded.prefix_cache())
    # metrics were computed by the in-memory model; the reloaded one must rank identically
    cache = reloaded.prefix_cache()
    result = evaluate(lambda h: reloaded.score_all_items(h, cache), data, "test", progress=False)
    assert result.metrics()["test/full/NDCG@10"] == pytest.approx(metrics["test/full/NDCG@10"], abs=1e-9)
    assert torch.isfinite(first[:, 1:]).all()
    # a model folder from the release whose config.json named the backbone section `llm` loads the same
    older = tmp_path / "older"
    shutil.copytree(out, older)
    meta = c.read_json(older / e4srec_model.CONFIG)
    meta["llm"] = meta.pop("backbone")
    c.write_json(older / e4srec_model.CONFIG, meta)
    torch.testing.assert_close(e4srec_model.load_model(older).score_all_items(hist), reloaded.score_all_items(hist))
    # what recommend, batch-recommend and serving score with: the adapter merged into the backbone and the
    # histories packed, no padding; in fp32 the scores of the model as trained (in bf16, to bf16's precision)
    from e4srec.recommend import Recommender

    as_trained = e4srec_model.load_model(out, dtype="fp32")
    padded = as_trained.score_all_items(hist, as_trained.prefix_cache())
    packed = Recommender(out, dtype="fp32").model.score_packed([[i for i in row.tolist() if i] for row in hist])
    torch.testing.assert_close(packed[:, 1:], padded[:, 1:], atol=1e-4, rtol=1e-4)

    from peft import PeftModel

    decoder = load_backbone(BackboneOptions(backbone="tiny")).model.get_decoder()
    peft = PeftModel.from_pretrained(decoder, str(out / e4srec_model.ADAPTER))  # a plain PEFT adapter folder
    assert any("lora_" in n for n, _ in peft.named_parameters())


def test_embeddings_of_another_item_map_or_dimension(prepared: Path, sasrec_dir: Path, tmp_path: Path,
                                                      beauty_slice: Path) -> None:
    other = tmp_path / "other"
    lines = beauty_slice.read_text().splitlines()[:300]
    (tmp_path / "other.txt").write_text("\n".join(lines) + "\n")
    prepare_data.run(prepare_data.PrepareDataConfig(), tmp_path / "other.txt", other)
    with pytest.raises(E4SRecError, match="item-map hash"):
        stage.run(stage.TrainE4SRecConfig(device="cpu"), other, sasrec_dir, "tiny", tmp_path / "x")
    small = tmp_path / "sasrec32"
    pretrain_sasrec.run(pretrain_sasrec.PretrainSasrecConfig(epochs=1, dim=32, device="cpu"), prepared, small,
                        progress=False)
    with pytest.raises(E4SRecError, match="32-dimensional but the input projection takes 64"):
        stage.run(stage.TrainE4SRecConfig(device="cpu"), prepared, small, "tiny", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert np.all(c.load_sequence_data(prepared).negatives > 0)


def test_lora_dropout_keeps_one_minus_p_scaled_and_replaces_torchs() -> None:
    from e4srec.e4srec import LoRADropout

    model = tiny_model()
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(type(m) is LoRADropout and m.p == 0.05 for m in drops)
    drop = LoRADropout(0.2).train()
    x = torch.ones(400, 500)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.005  # 200k draws: 4 sd is 0.0036
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.8))  # inverted dropout: mean preserved
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # seeded like torch's own (checkpoints restore the RNG)
    assert torch.equal(drop.eval()(x), x)


def test_lora_dropout_on_odd_sizes_and_strided_inputs() -> None:
    from e4srec.e4srec import LoRADropout

    drop = LoRADropout(0.5).train()
    for x in (torch.ones(3, 5).t(), torch.ones(7), torch.ones(0, 4)):  # non-contiguous, odd, empty
        y = drop(x)
        assert y.shape == x.shape and set(y.unique().tolist()) <= {0.0, 2.0}


def test_head_init_from_items_is_the_projected_table_at_the_default_row_norm() -> None:
    model = tiny_model()
    default_norm = model.head.weight[1:].norm(dim=1).mean()
    model.init_head_from_items()
    rows = model.item_emb.weight @ model.proj.weight.T  # (N+1, H)
    scale = model.head.weight[1:].norm(dim=1).mean() / rows[1:].norm(dim=1).mean()
    torch.testing.assert_close(model.head.weight, rows * scale)
    torch.testing.assert_close(model.head.weight[1:].norm(dim=1).mean(), default_norm)
    assert model.head.weight[0].abs().sum() == 0  # padding's row: zero, and its logit is -inf anyway


def test_batches_are_packed_only_where_lengths_differ() -> None:
    from e4srec.recommend import PACK_ITEMS, plan_batches

    mixed = [1, 50, 7, 3, 30, 12, 2, 9]  # eight concurrent requests: one packed pass, not several padded ones
    assert plan_batches(mixed, 64, packing=True) == [([0, 6, 3, 2, 7, 5, 4, 1], True)]  # by length
    assert len(plan_batches(mixed, 64, packing=False)) > 1 and not any(p for _, p in plan_batches(mixed, 64, False))
    assert plan_batches([50] * 64, 64, packing=True) == [(list(range(64)), False)]  # one length: padded, one pass
    lengths = [5] * 40 + [50] * 40
    plan = plan_batches(lengths, 16, packing=True)
    assert all(len(rows) <= 16 for rows, _ in plan)
    assert all(sum(lengths[i] for i in rows) <= PACK_ITEMS for rows, packed in plan if packed)
    assert all(len({lengths[i] for i in rows}) == 1 for rows, packed in plan if not packed)
    assert sorted(i for rows, _ in plan for i in rows) == list(range(80))
