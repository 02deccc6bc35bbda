"""Stage instruction-tune: LoRA SFT of the backbone on Alpaca-format data (E4SRec's second stage).

Output folder:
  backbone.json        what the E4SRec stage loads: backbone spec, dtype, quantization, and the
                       adapter / merged folder names (both null when the stage was skipped)
  adapter/             PEFT adapter (PeftModel.from_pretrained(base, "adapter") loads it) with
                       e4srec_base.json, the base it was trained on
  merged/              optional: the backbone with the adapter merged in (save_pretrained format)
  metrics.json         instruct/* numbers: held-out loss before and after, train loss, truncation
  generations.json     greedy answers to held-out prompts before and after tuning
  training_log.json    per-step loss and learning rate; loss_curve.png
`skip` writes only backbone.json and metrics.json: the base passes through untouched.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from e4srec import config as cfg
from e4srec import contracts as c
from e4srec import instructions as ins
from e4srec.backbones import Backbone, BackboneOptions, check_local, load_backbone
from e4srec.device import resolve_device
from e4srec.errors import E4SRecError
from e4srec.outputs import preflight, staged_output
from e4srec.progress import progress as progress_bar
from e4srec.prompt import alpaca
from e4srec.storage import fetch
from e4srec.tracking import Tracker, figure_to_artifact, stage_run

STAGE = "instruction-tune"
DESCRIPTOR = "backbone.json"
ADAPTER = "adapter"
MERGED = "merged"
BASE_RECORD = "e4srec_base.json"
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class InstructionTuneConfig(BackboneOptions):
    """Settings of instruction-tune (CLI flags, KFP parameters and backbone.json share them)."""

    skip: bool = cfg.option(False, "pass the base through untouched (right for an already instruction-tuned "
                                   "base such as SmolLM2-Instruct)")
    holdout: int = cfg.option(100, "examples held out (seeded) for the before/after loss and generations")
    max_examples: int = cfg.option(0, "train on the first N training examples only (0: all); CPU demos use a slice")
    epochs: int = cfg.option(1, "passes over the training examples")
    batch_size: int = cfg.option(8, "examples per micro-batch")
    grad_accum: int = cfg.option(1, "micro-batches per optimizer step")
    lr: float = cfg.option(2e-4, "peak AdamW learning rate (cosine decay after warmup)")
    warmup_ratio: float = cfg.option(0.1, "fraction of the optimizer steps spent warming up linearly")
    weight_decay: float = cfg.option(0.0, "AdamW weight decay on the LoRA weights")
    max_length: int = cfg.option(256, "tokens per example; longer ones are cut (counted and logged)")
    lora_r: int = cfg.option(16, "LoRA rank")
    lora_alpha: int = cfg.option(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = cfg.option(0.05, "LoRA dropout")
    target_modules: str = cfg.option(ALL_LINEAR, "comma-separated module names LoRA wraps")
    merge: bool = cfg.option(False, "also write the backbone with the adapter merged in (not for quantized bases)")
    generations: int = cfg.option(3, "held-out prompts answered greedily before and after tuning")
    max_new_tokens: int = cfg.option(48, "tokens per generated answer")
    seed: int = cfg.option(42, "seed for the split, the batch order and LoRA initialisation")
    device: str = cfg.option("auto", "cpu, cuda, cuda:N or auto")
    threads: int = cfg.option(0, "CPU threads for torch (0: torch's default)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "lora_r", "lora_alpha"):
            cfg.require(getattr(self, name) >= 1, self, name, "must be >= 1")
        for name in ("holdout", "max_examples", "generations", "max_new_tokens", "threads"):
            cfg.require(getattr(self, name) >= 0, self, name, "must be >= 0")
        cfg.require(self.lr > 0, self, "lr", "must be > 0")
        cfg.require(self.weight_decay >= 0, self, "weight_decay", "must be >= 0")
        cfg.require(0 <= self.warmup_ratio < 1, self, "warmup_ratio", "must be in [0, 1)")
        cfg.require(0 <= self.lora_dropout < 1, self, "lora_dropout", "must be in [0, 1)")
        cfg.require(bool(self.modules()), self, "target_modules", "name at least one module")
        cfg.require(not (self.merge and self.quantization != "none"), self, "merge",
                    "a quantized base cannot be merged; drop --merge or --quantization")

    def modules(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


@torch.no_grad()
def heldout_loss(model: Any, encoded: ins.Encoded, pad_id: int, batch_size: int, device: torch.device,
                 progress: bool = True) -> float:
    """Mean cross-entropy per response token over the held-out examples."""
    total, count = 0.0, 0
    starts = range(0, len(encoded.input_ids), batch_size)
    for s in progress_bar(starts, desc="held-out loss", unit="batch", disable=not progress, leave=False):
        batch = ins.collate(encoded.input_ids[s : s + batch_size], encoded.labels[s : s + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]  # token t predicts t+1
        loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                 shift_labels.reshape(-1), ignore_index=ins.IGNORE, reduction="sum")
        total, count = total + loss.item(), count + int((shift_labels != ins.IGNORE).sum())
    return total / max(count, 1)


@torch.no_grad()
def generate(model: Any, tokenizer: Any, examples: list[ins.Example], max_new_tokens: int,
             device: torch.device) -> list[str]:
    """Greedy answers to the examples' Alpaca prompts (left-padded batch)."""
    if not examples:
        return []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer([alpaca(e.instruction, e.input) for e in examples], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    finally:
        tokenizer.padding_side = side
    return [tokenizer.decode(o[batch["input_ids"].shape[1] :], skip_special_tokens=True).strip() for o in out]


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


def _descriptor(config: InstructionTuneConfig, *, adapter: bool, merged: bool, fingerprint: str | None) -> dict:
    return {"stage": STAGE, "backbone": config.backbone, "dtype": config.dtype, "quantization": config.quantization,
            "local_files_only": config.local_files_only, "fingerprint": fingerprint, "skipped": config.skip,
            ADAPTER: ADAPTER if adapter else None, MERGED: MERGED if merged else None}


def _plot(log: list[dict[str, float]]) -> Any:
    from e4srec.plots import plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([r["step"] for r in log], [r["train/loss"] for r in log], color="#4C72B0")
    ax.set(xlabel="optimizer step", ylabel="training loss (response tokens)", title="Instruction tuning")
    fig.tight_layout()
    return fig


def train(config: InstructionTuneConfig, backbone: Backbone, train_set: ins.Encoded, device: torch.device,
          tracker: Tracker, progress: bool) -> tuple[Any, list[dict[str, float]]]:
    """LoRA SFT with AdamW, cosine schedule with warmup, accumulation and clipping; returns (peft model, log)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(config.seed)
    model = backbone.model
    if config.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.modules(), task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise E4SRecError(f"InstructionTuneConfig.target_modules={config.target_modules!r}: {e}") from None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    micro = math.ceil(len(train_set.input_ids) / config.batch_size)
    total = config.epochs * math.ceil(micro / config.grad_accum)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total), total)
    rng = np.random.default_rng(config.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    pad = backbone.tokenizer.pad_token_id
    log: list[dict[str, float]] = []
    step, running = 0, 0.0
    model.train()
    bar = progress_bar(range(total), desc=STAGE, unit="step", disable=not progress, mininterval=5)
    batches = [order for _ in range(config.epochs) for order in np.array_split(
        rng.permutation(len(train_set.input_ids)), micro)]
    for i, rows in enumerate(batches):
        batch = ins.collate([train_set.input_ids[r] for r in rows], [train_set.labels[r] for r in rows], pad)
        with autocast:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss / config.grad_accum
        loss.backward()
        running += loss.item()
        if (i + 1) % config.grad_accum == 0 or i + 1 == len(batches):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            row = {"step": step, "train/loss": running, "train/lr": scheduler.get_last_lr()[0]}
            log.append(row)
            tracker.log_metrics({"train/loss": running, "train/lr": row["train/lr"]}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", refresh=False)
            running = 0.0
    bar.close()
    model.eval()
    return model, log


def run(config: InstructionTuneConfig, instructions: Path | str | None, output: Path | str, *,
        overwrite: bool = False, tracker: Tracker | None = None, progress: bool = True) -> dict[str, float]:
    """Tune (or pass through) the backbone and write the stage's folder into `output`."""
    tracker = tracker or Tracker(None)
    preflight(output, overwrite, {"--instructions": instructions, "--backbone": config.backbone.split(":", 1)[-1]})
    check_local(config.backbone)
    tracker.log_params(cfg.to_dict(config))
    if config.skip:
        metrics = {"instruct/skipped": 1.0}
        with staged_output(output, overwrite) as out:
            c.write_json(out / DESCRIPTOR, _descriptor(config, adapter=False, merged=False, fingerprint=None))
            c.write_json(out / c.METRICS, metrics)
        tracker.log_metrics(metrics)
        return metrics
    if instructions is None:
        raise E4SRecError("instruction-tune needs --instructions (an Alpaca JSON, JSONL or Parquet file), or --skip")
    examples = ins.read_examples(fetch(instructions))  # fail on bad data before loading any model
    train_examples, held = ins.split(examples, config.holdout, config.seed)
    if config.max_examples:
        train_examples = train_examples[: config.max_examples]
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    t0 = time.perf_counter()
    backbone = load_backbone(config, device)
    leaves = {name.rsplit(".", 1)[-1] for name, _ in backbone.model.named_modules()}
    missing = [m for m in config.modules() if m not in leaves]
    if missing:  # now, not after the held-out pass
        raise E4SRecError(f"InstructionTuneConfig.target_modules={config.target_modules!r}: {missing[0]!r} is not a "
                          f"module of {config.backbone} (it has e.g. {', '.join(sorted(leaves - {''})[:8])})")
    tok = backbone.tokenizer
    train_set = ins.encode(train_examples, tok, config.max_length)
    held_set = ins.encode(held, tok, config.max_length)
    if not train_set.input_ids:
        raise E4SRecError(f"no training example fits max_length={config.max_length}; raise --max-length")
    shown = held[: config.generations]
    before_loss = heldout_loss(backbone.model, held_set, tok.pad_token_id, config.batch_size, device, progress)
    before = generate(backbone.model, tok, shown, config.max_new_tokens, device)
    t1 = time.perf_counter()
    model, log = train(config, backbone, train_set, device, tracker, progress)
    train_seconds = time.perf_counter() - t1
    after_loss = heldout_loss(model, held_set, tok.pad_token_id, config.batch_size, device, progress)
    after = generate(model, tok, shown, config.max_new_tokens, device)
    n_train = len(train_set.input_ids) * config.epochs
    metrics = {
        "instruct/heldout_loss_before": before_loss,
        "instruct/heldout_loss_after": after_loss,
        "instruct/train_loss_first": log[0]["train/loss"],
        "instruct/train_loss_last": log[-1]["train/loss"],
        "instruct/train_examples": float(len(train_set.input_ids)),
        "instruct/heldout_examples": float(len(held_set.input_ids)),
        "instruct/truncated": float(train_set.truncated + held_set.truncated),
        "instruct/dropped_too_long": float(train_set.dropped + held_set.dropped),
        "instruct/steps": float(len(log)),
        "instruct/train_seconds": train_seconds,
        "instruct/examples_per_second": n_train / train_seconds,
        "instruct/seconds": time.perf_counter() - t0,
    }
    generations = [{"instruction": e.instruction, "input": e.input, "reference": e.output, "before": b, "after": a}
                   for e, b, a in zip(shown, before, after)]
    with staged_output(output, overwrite) as out:
        model.save_pretrained(str(out / ADAPTER))
        c.write_json(out / ADAPTER / BASE_RECORD, backbone.identity())
        if config.merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(str(out / MERGED))
            tok.save_pretrained(str(out / MERGED))
        c.write_json(out / DESCRIPTOR, _descriptor(config, adapter=True, merged=config.merge,
                                                   fingerprint=backbone.fingerprint))
        c.write_json(out / c.METRICS, metrics)
        c.write_json(out / "generations.json", generations)
        (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
        tracker.log_metrics(metrics)
        for name in (DESCRIPTOR, c.METRICS, "generations.json", "training_log.json"):
            tracker.log_artifact(out / name)
        tracker.log_artifacts(out / ADAPTER, ADAPTER)
        figure_to_artifact(tracker, _plot(log), "loss_curve.png", out)
    return metrics


def run_tracked(config: InstructionTuneConfig, instructions: Path | str | None, output: Path | str, *,
                overwrite: bool = False, tracking: bool = True, experiment: str = "e4srec",
                pipeline_run_id: str = "", pipeline_run_name: str = "", progress: bool = True) -> dict[str, float]:
    """`run` inside the stage's MLflow run (nested under the pipeline run when ids are given)."""
    # before the MLflow run: a refused output leaves no FAILED run behind
    preflight(output, overwrite, {"--instructions": instructions, "--backbone": config.backbone.split(":", 1)[-1]})
    with stage_run(STAGE, enabled=tracking, experiment=experiment, pipeline_run_id=pipeline_run_id,
                   pipeline_run_name=pipeline_run_name) as tracker:
        return run(config, instructions, output, overwrite=overwrite, tracker=tracker, progress=progress)
