"""Precision: a bf16 backbone trains, evaluates, recommends, batch-recommends and extends like fp32;
broken numbers (NaN or infinite scores, a diverging loss) never pass as results."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from e4srec import checkpoints
from e4srec import contracts as c
from e4srec import e4srec as e4srec_model
from e4srec import sasrec as sasrec_model
from e4srec.backbones import attention_for, resolve_dtype
from e4srec.device import cpu_flags, cpu_has_bf16_units, cpu_model
from e4srec.evaluate import evaluate, full_ranks, metrics_from_ranks, rank_last_if_not_finite, sampled_ranks
from e4srec.extend import extend_items
from e4srec.recommend import Recommender
from e4srec.stages import batch_recommend
from e4srec.stages import train_e4srec as stage
from helpers import e4srec

# bf16 keeps 8 bits of mantissa: scores of the same trained model differ from fp32 by a few tenths of
# a percent of their spread, which reorders near-ties only.
SCORE_TOLERANCE = 0.05  # max |bf16 - fp32| score difference, in units of the fp32 scores' std per row
TOP10_OVERLAP = 0.8  # mean share of fp32's top-10 that bf16's top-10 contains


@pytest.fixture(scope="module")
def bf16_model(prepared: Path, sasrec_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """train-e4srec with the tiny backbone in bf16, trained and evaluated in that precision."""
    out = tmp_path_factory.mktemp("bf16") / "model"
    config = stage.TrainE4SRecConfig(dtype="bf16", device="cpu", batch_size=32, lr=2e-3, max_examples=600,
                                     eval_users=150)
    metrics = stage.run(config, prepared, sasrec_dir, "tiny", out, progress=False)
    return out, metrics


def test_bf16_trains_and_evaluates(bf16_model: tuple[Path, dict]) -> None:
    out, metrics = bf16_model
    saved = c.read_json(out / e4srec_model.CONFIG)
    assert saved["backbone"]["dtype"] == "bf16" and saved["trained_dtype"] == "bf16"
    assert metrics["train/loss_last"] < metrics["train/loss_first"]
    ranked = {k: v for k, v in metrics.items() if k.startswith(("valid/", "test/"))}
    assert ranked and all(np.isfinite(v) and 0 <= v <= 1 for v in ranked.values())
    model = e4srec_model.load_model(out)  # the recorded precision comes back
    assert next(model.llm.get_base_model().parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in model.trainable_state().values()} == {torch.float32}  # LoRA, projection, head


def test_cpu_autocast_trains_close_to_plain_bf16(bf16_model: tuple[Path, dict], prepared: Path, sasrec_dir: Path,
                                                 tmp_path: Path) -> None:
    """--autocast computes LoRA, projection and head in bf16 too: the same run's losses move a little, not much."""
    config = stage.TrainE4SRecConfig(dtype="bf16", device="cpu", batch_size=32, lr=2e-3, max_examples=600,
                                     eval_users=150, autocast=True)
    metrics = stage.run(config, prepared, sasrec_dir, "tiny", tmp_path / "model", progress=False)
    plain = [row["train/loss"] for row in json.loads((bf16_model[0] / "training_log.json").read_text())]
    mixed = [row["train/loss"] for row in json.loads((tmp_path / "model" / "training_log.json").read_text())]
    assert len(mixed) == len(plain) and mixed != plain  # autocast did change the arithmetic
    assert np.allclose(mixed, plain, rtol=0.02), (mixed, plain)
    assert metrics["train/loss_last"] < metrics["train/loss_first"]
    assert all(np.isfinite(v) and 0 <= v <= 1 for k, v in metrics.items() if k.startswith(("valid/", "test/")))
    model = e4srec_model.load_model(tmp_path / "model")
    assert {p.dtype for p in model.trainable_state().values()} == {torch.float32}  # fp32 master weights


def test_bf16_ranks_like_fp32_on_the_same_model(bf16_model: tuple[Path, dict], prepared: Path) -> None:
    out, _ = bf16_model
    data = c.load_sequence_data(prepared)
    hist = torch.as_tensor(data.split("test")[0][:64, -20:])
    scores = {}
    for dtype in ("bf16", "fp32"):
        model = e4srec_model.load_model(out, dtype=dtype)
        scores[dtype] = model.score_all_items(hist, model.prefix_cache())[:, 1:]
    lo, hi = scores["bf16"], scores["fp32"]
    spread = hi.std(dim=1, keepdim=True)
    assert ((lo - hi).abs() / spread).max() <= SCORE_TOLERANCE
    top_lo, top_hi = lo.topk(10).indices, hi.topk(10).indices
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top_lo, top_hi)])
    assert overlap >= TOP10_OVERLAP
    assert (top_lo[:, 0] == top_hi[:, 0]).float().mean() >= 0.9  # the first item almost always agrees


def test_bf16_recommend_batch_recommend_and_extend(bf16_model: tuple[Path, dict], prepared: Path,
                                                   tmp_path: Path) -> None:
    out, _ = bf16_model
    data = c.load_sequence_data(prepared)
    history = [str(data.item_ids[i]) for i in data.sequence(0)]
    cli = e4srec("recommend", "--model", out, "--history", *history, "--k", "5")
    assert cli.returncode == 0, cli.stderr
    recommender = Recommender(out)
    (rec,) = recommender.recommend([history], 5)
    assert len(rec.items) == 5 and all(np.isfinite(rec.scores)) and not set(rec.items) & set(history)
    assert json.loads(cli.stdout)["items"] == rec.items
    in_fp32 = e4srec("recommend", "--model", out, "--history", *history, "--k", "5", "--dtype", "fp32")
    assert in_fp32.returncode == 0, in_fp32.stderr
    assert len(set(json.loads(in_fp32.stdout)["items"]) & set(rec.items)) >= 4  # the same model, in fp32

    metrics = batch_recommend.run(batch_recommend.BatchRecommendConfig(k=5, max_users=20, device="cpu"), out,
                                  prepared, tmp_path / "batch", progress=False)
    table = pq.read_table(tmp_path / "batch" / batch_recommend.OUTPUT).to_pydict()
    assert metrics["batch/users"] == 20 and table["items"][0] == rec.items

    new = tmp_path / "new.parquet"
    pq.write_table(pa.table({"item_id": ["new-1"], "embedding": [np.full(64, 0.1, np.float32).tolist()]}), new)
    extend_items(out, new, tmp_path / "extended")
    extended = Recommender(tmp_path / "extended")
    assert next(extended.model.module.llm.get_base_model().parameters()).dtype == torch.bfloat16
    (again,) = extended.recommend([history], 5)
    assert len(again.items) == 5 and all(np.isfinite(again.scores))


def test_cpu_model_names_the_generation(tmp_path: Path) -> None:
    # a VM's "AMD EPYC" alone does not tell Zen 4 from Zen 5: the family and model numbers do
    info = tmp_path / "cpuinfo"
    block = ("processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: {}\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
             "flags\t\t: fpu avx2 {}\n")
    info.write_text(block.format(0, 26, "avx512f avx512_bf16") + "\n" + block.format(1, 99, "amx_tile") + "\n")
    assert cpu_model(info) == "AMD EPYC (cpu family 26, model 2)"
    assert cpu_flags(info) == ["avx2", "avx512f", "avx512_bf16"]  # the first block's, in CPU_FLAGS order
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\n")
    assert cpu_model(info) == "Some CPU" and cpu_flags(info) == []
    missing = tmp_path / "missing"  # no /proc: what platform knows, and no flags
    assert cpu_model(missing) == (platform.processor() or platform.machine()) and cpu_flags(missing) == []


def test_auto_precision_follows_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_bf16_units() else torch.float32)
    if cpu_flags():  # Linux: torch's probe agrees with what the CPU reports
        assert cpu_has_bf16_units() == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & set(cpu_flags()))
    assert attention_for(torch.bfloat16, cpu) == "eager" and attention_for(torch.float32, cpu) is None
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("fp32", cpu) == torch.float32 and resolve_dtype("bf16", cpu) == torch.bfloat16


def test_nan_and_inf_scores_rank_last_never_as_hits(prepared: Path) -> None:
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([
        [0.0, nan, 1.0, 2.0, 3.0],  # NaN target: last, not first
        [0.0, inf, 1.0, 2.0, 3.0],  # +inf target: a broken score, last too
        [0.0, 1.0, nan, nan, nan],  # NaN elsewhere: the target beats them
    ])
    clean = rank_last_if_not_finite(scores.clone())
    empty = (torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    ranks = full_ranks(clean.clone(), empty, torch.tensor([1, 1, 1]))
    assert ranks.tolist() == [4, 4, 0]
    assert sampled_ranks(clean, torch.tensor([1, 1, 1]), torch.tensor([[2, 3]] * 3)).tolist() == [2, 2, 0]

    data = c.load_sequence_data(prepared)
    result = evaluate(lambda h: torch.full((h.shape[0], data.n_items + 1), nan), data, "test", progress=False)
    m = result.metrics()
    assert m["test/full/HR@10"] == 0.0 and m["test/sampled/HR@10"] == 0.0 and m["test/full/NDCG@10"] == 0.0
    assert all(np.isfinite(v) for v in m.values())
    assert metrics_from_ranks(result.ranks["full"])["MRR"] < 0.01


def test_nan_scores_are_never_recommended(bf16_model: tuple[Path, dict]) -> None:
    out, _ = bf16_model
    recommender = Recommender(out, dtype="fp32")
    broken = {3, 5, 8}
    model = recommender.model
    assert model.score_packed is not None  # an E4SRec scores packed histories; a SASRec (None) padded ones

    def with_nan(real: Callable) -> Callable:
        def scores(histories: object) -> torch.Tensor:
            s = real(histories)
            s[:, sorted(broken)] = float("nan")
            return s

        return scores

    score, packed = model.score, model.score_packed
    for path in ("packed", "padded"):  # both scoring paths
        model.score, model.score_packed = with_nan(score), with_nan(packed) if path == "packed" else None
        (rec,) = recommender.recommend([[]], 20)
        assert not {recommender.index[i] for i in rec.items} & broken and all(np.isfinite(rec.scores))
        (everything,) = recommender.recommend([[recommender.item_ids[1]]], recommender.n_items)
        assert len(everything.items) == recommender.n_items - 1 and recommender.item_ids[1] not in everything.items
        assert {recommender.index[i] for i in everything.items[-3:]} == broken  # broken last; history, padding never


def test_a_diverging_loss_stops_training_with_one_line(prepared: Path, sasrec_dir: Path, tmp_path: Path) -> None:
    result = e4srec("train-e4srec", "--data", prepared, "--sasrec", sasrec_dir, "--backbone", "tiny", "--device", "cpu",
                    "--dtype", "fp32", "--lr", "1e30", "--max-examples", "256", "--batch-size", "16", "--no-tracking",
                    "--output", tmp_path / "out")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error:" in line]  # beside loading and progress logs
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "loss is nan at optimizer step" in errors[0] and "--lr 1e+30" in errors[0], errors[0]
    assert "item embeddings" in errors[0]
    assert not (tmp_path / "out").exists()


def test_resume_refuses_a_checkpoint_of_another_precision(prepared: Path, sasrec_dir: Path, tmp_path: Path) -> None:
    from e4srec.backbones import BackboneOptions, load_backbone
    from e4srec.errors import E4SRecError
    from e4srec.tracking import Tracker

    data = c.load_sequence_data(prepared)
    table = sasrec_model.load_item_embeddings(sasrec_dir, data.item_map_sha256)
    histories, targets = data.prefix_examples(50)
    config = stage.TrainE4SRecConfig(batch_size=16, max_examples=64, checkpoint_every=2, resume=True, device="cpu")
    saved = checkpoints.Checkpoints(tmp_path / "ckpt", rank=0)

    def train(dtype: str) -> None:
        backbone = load_backbone(BackboneOptions(backbone="tiny", dtype=dtype))
        model = stage.build_model(config, backbone, table, data.n_items, data.max_len)
        stage.train(config, model, histories[:64], targets[:64], torch.device("cpu"), saved, Tracker(None),
                    progress=False)

    train("bf16")
    assert c.read_json(tmp_path / "ckpt" / "progress.json")["backbone_dtype"] == "torch.bfloat16"
    with pytest.raises(E4SRecError, match="trained with a torch.bfloat16 backbone.*resume with --dtype bf16"):
        train("fp32")
    config.autocast = True  # same precision, other arithmetic: resuming would not match an unbroken run
    with pytest.raises(E4SRecError, match="trained without autocast, this run with it; resume with --no-autocast"):
        train("bf16")
