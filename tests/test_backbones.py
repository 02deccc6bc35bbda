"""Backbones: the registry, the tiny model, GGUF errors, 8-bit and NF4 on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from e4srec import backbones as b
from e4srec.errors import E4SRecError
from helpers import e4srec


def test_registry_lists_kinds_and_rejects_unknown_names() -> None:
    assert {"smollm2-135m", "tiny", "gguf:...", "hf:..."} <= set(b.registered())
    with pytest.raises(E4SRecError, match=r"unknown; registered: smollm2-135m, gguf:\.\.\., hf:\.\.\., tiny"):
        b.BackboneOptions(backbone="llama-7b")
    with pytest.raises(E4SRecError, match="needs an argument"):
        b.parse_spec("hf")
    result = e4srec("instruction-tune", "--skip", "--backbone", "nope", "--output", Path("never-written"))
    assert result.returncode == 1 and "registered: smollm2-135m" in result.stderr
    listing = e4srec("backbones")
    assert listing.returncode == 0 and "tiny" in listing.stdout and "cache:" in listing.stdout


def test_tiny_backbone_is_the_same_model_on_every_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = b.load_backbone(b.BackboneOptions(backbone="tiny"))
    monkeypatch.setenv(b.CACHE_ENV, str(tmp_path))  # a fresh cache: built again from code
    second = b.load_backbone(b.BackboneOptions(backbone="tiny"))
    assert second.source.startswith(str(tmp_path))
    for (n1, p1), (n2, p2) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert first.fingerprint == second.fingerprint
    text = "### Response:\nParis"
    assert first.tokenizer.decode(first.tokenizer(text)["input_ids"]) == text
    assert not any(p.requires_grad for p in first.model.parameters())  # frozen


def test_gguf_missing_or_corrupt(tmp_path: Path) -> None:
    with pytest.raises(E4SRecError, match="GGUF file not found"):
        b.resolve(f"gguf:{tmp_path / 'missing.gguf'}")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(E4SRecError, match="broken.gguf: not a readable GGUF model"):
        b.resolve(f"gguf:{bad}")


def test_hf_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(E4SRecError, match="has no config.json"):
        b.resolve(f"hf:{tmp_path}")
    with pytest.raises(E4SRecError, match="folder not found"):
        b.resolve("hf:./no/such/folder")


@pytest.mark.parametrize(("quantization", "layer"), [("nf4", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_tiny_backbone_trains_a_lora_step_on_cpu(quantization: str, layer: str) -> None:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    bb = b.load_backbone(b.BackboneOptions(backbone="tiny", quantization=quantization))
    assert layer in {type(m).__name__ for m in bb.model.modules()}
    model = prepare_model_for_kbit_training(bb.model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                                             task_type="CAUSAL_LM"))
    ids = bb.tokenizer("Given the user's purchase history", return_tensors="pt")["input_ids"]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
