"""instruction-tune on the tiny backbone: it learns, the adapter reloads, skip and merge work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from e4srec import contracts as c
from e4srec import llm
from e4srec.backbones import BackboneOptions, load_backbone
from e4srec.errors import E4SRecError
from e4srec.stages import instruction_tune as stage
from helpers import DATA


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "out"
    config = stage.InstructionTuneConfig(backbone="tiny", max_examples=16, holdout=8, epochs=6, batch_size=4,
                                         lr=5e-3, device="cpu", generations=2, max_new_tokens=4, merge=True,
                                         dtype="fp32")  # the reload tests compare logits at 1e-5
    stage.run(config, DATA / "instructions.json", out, progress=False)
    return out


def test_training_lowers_the_loss(tuned: Path) -> None:
    m = c.read_json(tuned / c.METRICS)
    assert m["instruct/train_loss_last"] < m["instruct/train_loss_first"]
    assert m["instruct/heldout_loss_after"] < m["instruct/heldout_loss_before"]
    assert m["instruct/steps"] == 24 and m["instruct/train_examples"] == 16
    log = json.loads((tuned / "training_log.json").read_text())
    assert max(r["train/lr"] for r in log) <= 5e-3 and log[-1]["train/lr"] < 1e-4  # warmup, then cosine to ~0
    gens = c.read_json(tuned / "generations.json")
    assert len(gens) == 2 and {"before", "after", "reference"} <= set(gens[0])


def test_adapter_reloads_with_plain_peft_and_gives_the_same_logits(tuned: Path) -> None:
    from peft import PeftModel

    ids = torch.tensor([[5, 17, 42, 99, 3]])
    in_memory, descriptor = llm.load_tuned_backbone(tuned)  # adapter merged by e4srec
    assert descriptor["adapter"] == "adapter" and descriptor["backbone"] == "tiny"
    fp32 = BackboneOptions(backbone="tiny", dtype="fp32")
    plain = PeftModel.from_pretrained(load_backbone(fp32).model, str(tuned / "adapter"))
    base = load_backbone(fp32).model
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        torch.testing.assert_close(in_memory.model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base(input_ids=ids).logits, expected)  # the adapter changed something
        merged = load_backbone(BackboneOptions(backbone=f"hf:{tuned / 'merged'}", dtype="fp32")).model
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_adapter_for_another_base_is_refused(tuned: Path) -> None:
    other = load_backbone(BackboneOptions(backbone="tiny"))
    other.spec, other.fingerprint = "smollm2-135m", "0123456789abcdef"
    with pytest.raises(E4SRecError, match="adapter was trained on backbone 'tiny'"):
        llm.apply_adapter(other, tuned / "adapter")


def test_skip_passes_the_base_through(tmp_path: Path) -> None:
    config = stage.InstructionTuneConfig(backbone="tiny", skip=True)
    metrics = stage.run(config, None, tmp_path / "out")
    assert metrics == {"instruct/skipped": 1.0}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["backbone.json", "metrics.json"]
    backbone, descriptor = llm.load_tuned_backbone(tmp_path / "out")
    assert descriptor["skipped"] and descriptor["adapter"] is None
    base = load_backbone(BackboneOptions(backbone="tiny"))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(backbone.model(input_ids=ids).logits, base.model(input_ids=ids).logits)


def test_a_bf16_backbone_carries_the_adapter_and_e4srec_builds_on_it(tuned: Path) -> None:
    from e4srec.stages import train_e4srec

    ids = torch.tensor([[5, 17, 42, 99, 3]])
    merged, _ = llm.load_tuned_backbone(tuned)  # fp32, as recorded
    half, descriptor = llm.load_tuned_backbone(tuned, dtype="bf16")
    base = load_backbone(BackboneOptions(backbone="tiny", dtype="fp32")).model
    assert descriptor["dtype"] == "bf16" and next(half.model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        a, b = merged.model(input_ids=ids).logits, half.model(input_ids=ids).logits.float()
        change = (a - base(input_ids=ids).logits).abs().max()
    assert (a - b).abs().max() < 0.1 * change  # bf16 rounding, far below what the adapter changed
    table = torch.randn(11, 64)
    model = train_e4srec.build_model(train_e4srec.TrainE4SRecConfig(), half, table, 10, 5)
    scores = model.score_all_items(torch.tensor([[0, 3, 4]]), model.prefix_cache())
    assert torch.isfinite(scores[:, 1:]).all()
