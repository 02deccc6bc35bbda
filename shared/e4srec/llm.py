"""The LLM an E4SRec runs on: a backbone spec, or an instruction-tune output folder.

An instruction-tune output (the pipeline's `llm` artifact) holds:
  backbone.json   the backbone spec, dtype, quantization, and the adapter / merged folder names
                  (both null when the stage was skipped: the base passes through)
  adapter/        a PEFT adapter, with e4srec_base.json naming the base it was trained on
  merged/         optional: the backbone with the adapter merged in (save_pretrained format)
`load_llm` turns either form into a loaded Backbone; train-e4srec records the backbone's fields
(LLM_FIELDS) in its config.json and copies the adapter, so a trained model reloads without the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from e4srec import contracts as c
from e4srec.backbones import Backbone, BackboneOptions, load_backbone, parse_spec
from e4srec.errors import E4SRecError

DESCRIPTOR = "backbone.json"
ADAPTER = "adapter"
MERGED = "merged"
BASE_RECORD = "e4srec_base.json"
LLM_FIELDS = ("backbone", "dtype", "quantization", "local_files_only")  # BackboneOptions, as recorded


def apply_adapter(backbone: Backbone, adapter_dir: Path | str, *, merge: bool = True) -> Backbone:
    """Stack (or merge) an instruction adapter onto `backbone`, refusing one trained on another base."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise E4SRecError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    base = c.read_json(adapter_dir / BASE_RECORD) if (adapter_dir / BASE_RECORD).is_file() else {}
    if base.get("fingerprint") != backbone.fingerprint or base.get("backbone") != backbone.spec:
        raise E4SRecError(
            f"{adapter_dir}: adapter was trained on backbone {base.get('backbone')!r} "
            f"(architecture {base.get('fingerprint')}), not on {backbone.spec!r} ({backbone.fingerprint}); "
            f"pass the backbone it was trained on"
        )
    model = PeftModel.from_pretrained(backbone.model, str(adapter_dir))
    if merge:
        model = model.merge_and_unload()
    model.requires_grad_(False)
    return Backbone(model.eval(), backbone.tokenizer, backbone.spec, backbone.source, backbone.fingerprint)


def load_tuned_backbone(stage_dir: Path | str, device: torch.device | str = "cpu", dtype: str | None = None
                        ) -> tuple[Backbone, dict]:
    """What the E4SRec stage calls: the backbone an instruction-tune output describes, adapter applied.

    `dtype` (when given) replaces the recorded precision; the adapter is merged in that precision.
    """
    stage_dir = Path(stage_dir)
    descriptor = c.read_json_object(stage_dir / DESCRIPTOR, {"backbone": str, "dtype": str, "quantization": str,
                                                             "local_files_only": bool},
                                    "point --llm at an instruction-tune output, or re-run instruction-tune")
    for key in (ADAPTER, MERGED):
        value = descriptor.get(key)
        if value is not None and (not isinstance(value, str) or not (stage_dir / value).is_dir()):
            raise E4SRecError(f"{stage_dir / DESCRIPTOR}: field {key!r} is {value!r}, not a folder beside it; "
                              f"re-run instruction-tune")
    if dtype is not None:
        descriptor = {**descriptor, "dtype": dtype}
    options = BackboneOptions(**{k: descriptor[k] for k in ("backbone", "dtype", "quantization", "local_files_only")})
    if descriptor.get(MERGED):
        options.backbone = f"hf:{stage_dir / descriptor[MERGED]}"
        backbone = load_backbone(options, device)
        backbone.spec = descriptor["backbone"]
        return backbone, descriptor
    backbone = load_backbone(options, device)
    if descriptor.get(ADAPTER):
        backbone = apply_adapter(backbone, stage_dir / descriptor[ADAPTER], merge=options.quantization == "none")
    return backbone, descriptor


def load_llm(llm: str | Path, device: torch.device, dtype: str = "auto"
             ) -> tuple[Backbone, dict[str, Any], Path | None]:
    """An instruction-tune output folder, or a backbone spec: (backbone, descriptor, instruct adapter dir).

    `dtype` is this stage's precision; it replaces the one the instruction-tune output was made with.
    """
    path = Path(llm)
    if (path / DESCRIPTOR).is_file():
        backbone, descriptor = load_tuned_backbone(path, device, dtype)
        adapter = path / descriptor[ADAPTER] if descriptor.get(ADAPTER) else None
        return backbone, descriptor, adapter
    if path.exists():
        raise E4SRecError(f"{path}: no {DESCRIPTOR}; pass an instruction-tune output or a backbone spec")
    parse_spec(str(llm))  # a spec, or the one-line error with the registered names
    options = BackboneOptions(backbone=str(llm), dtype=dtype)
    descriptor = {k: getattr(options, k) for k in LLM_FIELDS}
    return load_backbone(options, device), descriptor, None
