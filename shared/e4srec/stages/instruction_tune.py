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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from e4srec import config as cfg
from e4srec import contracts as c
from e4srec import instructions as ins
from e4srec.backbones import Backbone, check_local, load_backbone
from e4srec.device import resolve_device
from e4srec.errors import E4SRecError
from e4srec.llm import ADAPTER, BASE_RECORD, DESCRIPTOR, MERGED
from e4srec.outputs import preflight, staged_output
from e4srec.progress import progress as progress_bar
from e4srec.prompt import alpaca
from e4srec.settings import InstructionTuneConfig
from e4srec.storage import fetch
from e4srec.tracking import Tracker, figure_to_artifact, tracked
from e4srec.training import Optimizer

STAGE = "instruction-tune"


@torch.no_grad()
def heldout_loss(model: Any, encoded: ins.Encoded, tokenizer: Any, batch_size: int, device: torch.device,
                 progress: bool = True) -> float:
    """Mean cross-entropy per response token over the held-out examples."""
    total, count = 0.0, 0
    n = len(encoded.input_ids)
    order = [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    for rows in progress_bar(order, desc="held-out loss", unit="batch", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in ins.collate(encoded, tokenizer, rows).items()}
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
    micro = math.ceil(len(train_set.input_ids) / config.batch_size)
    total = config.epochs * math.ceil(micro / config.grad_accum)
    optimizer = Optimizer([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                          weight_decay=config.weight_decay, warmup_ratio=config.warmup_ratio, total_steps=total,
                          max_grad_norm=config.max_grad_norm)
    rng = np.random.default_rng(config.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    log: list[dict[str, float]] = []
    step, running = 0, 0.0
    model.train()
    bar = progress_bar(range(total), desc=STAGE, unit="step", disable=not progress, mininterval=5)
    batches = [order for _ in range(config.epochs) for order in np.array_split(
        rng.permutation(len(train_set.input_ids)), micro)]
    for i, rows in enumerate(batches):
        batch = ins.collate(train_set, backbone.tokenizer, rows)
        with autocast:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss / config.grad_accum
        loss.backward()
        running += loss.item()
        if (i + 1) % config.grad_accum == 0 or i + 1 == len(batches):
            optimizer.clip()
            optimizer.step()
            step += 1
            row = {"step": step, "train/loss": running, "train/lr": optimizer.lr}
            log.append(row)
            tracker.log_metrics({"train/loss": running, "train/lr": row["train/lr"]}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", refresh=False)
            running = 0.0
    bar.close()
    model.eval()
    return model, log


def check(config: InstructionTuneConfig, instructions: Path | str | None, output: Path | str,
          overwrite: bool = False) -> None:
    """Refuse, before any work, an output that is not free or that overlaps the inputs."""
    preflight(output, overwrite, {"--instructions": instructions, "--backbone": config.backbone.split(":", 1)[-1]})


def run(config: InstructionTuneConfig, instructions: Path | str | None, output: Path | str, *,
        overwrite: bool = False, tracker: Tracker | None = None, progress: bool = True) -> dict[str, float]:
    """Tune (or pass through) the backbone and write the stage's folder into `output`."""
    tracker = tracker or Tracker(None)
    check(config, instructions, output, overwrite)
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
    before_loss = heldout_loss(backbone.model, held_set, tok, config.batch_size, device, progress)
    before = generate(backbone.model, tok, shown, config.max_new_tokens, device)
    t1 = time.perf_counter()
    model, log = train(config, backbone, train_set, device, tracker, progress)
    train_seconds = time.perf_counter() - t1
    after_loss = heldout_loss(model, held_set, tok, config.batch_size, device, progress)
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


run_tracked = tracked(STAGE, check)(run)
