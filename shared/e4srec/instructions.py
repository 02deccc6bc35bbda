"""Alpaca-format instruction data: read, validate, split, tokenize with the loss on the response only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from e4srec.errors import E4SRecError
from e4srec.prompt import alpaca

FIELDS = ("instruction", "input", "output")
IGNORE = -100  # label value cross-entropy skips: prompt and padding tokens carry no loss


@dataclass
class Example:
    instruction: str
    input: str
    output: str


def read_examples(path: Path | str) -> list[Example]:
    """Read a JSON list, JSON Lines or Parquet file of {instruction, input, output} records."""
    path = Path(path)
    if not path.is_file():
        raise E4SRecError(f"{path}: instruction file not found")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        records: list[Any] = pq.read_table(path).to_pylist()
        where = "row"
    elif suffix == ".jsonl":
        records, where = [], "line"
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise E4SRecError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
    else:
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise E4SRecError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not isinstance(records, list):
            raise E4SRecError(f"{path}: expected a JSON list of {{instruction, input, output}} records")
        where = "record"
    if not records:
        raise E4SRecError(f"{path}: no examples")
    examples = []
    for i, rec in enumerate(records):
        n = i + 1 if where == "line" else i
        if not isinstance(rec, dict):
            raise E4SRecError(f"{path} {where} {n}: expected an object with fields {', '.join(FIELDS)}")
        missing = [f for f in FIELDS if f not in rec]
        if missing:
            raise E4SRecError(f"{path} {where} {n}: missing field {', '.join(missing)} (has {', '.join(rec)}); "
                              f"Alpaca records need {', '.join(FIELDS)} (input may be empty)")
        if not str(rec["instruction"] or "").strip():
            raise E4SRecError(f"{path} {where} {n}: empty instruction; fill it or drop the record")
        if not str(rec["output"] or "").strip():
            raise E4SRecError(f"{path} {where} {n}: empty output; there is nothing to learn, drop the record")
        examples.append(Example(str(rec["instruction"]), str(rec["input"] or ""), str(rec["output"])))
    return examples


def split(examples: list[Example], holdout: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a seeded shuffle, the last `holdout` examples held out."""
    if holdout >= len(examples):
        raise E4SRecError(f"holdout={holdout} leaves no training example out of {len(examples)}; lower --holdout")
    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples[i] for i in order[: len(order) - holdout]], [examples[i] for i in order[len(order) - holdout :]]


@dataclass
class Encoded:
    """Token ids with labels masked outside the response; `truncated` counts cut examples."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    truncated: int
    dropped: int  # prompts so long that not one response token fit


def encode(examples: list[Example], tokenizer: Any, max_length: int) -> Encoded:
    """Prompt + output + EOS, cut to `max_length`; labels are IGNORE on prompt tokens."""
    ids, labels, truncated, dropped = [], [], 0, 0
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for ex in examples:
        prompt = tokenizer(alpaca(ex.instruction, ex.input), add_special_tokens=False)["input_ids"]
        answer = tokenizer(ex.output, add_special_tokens=False)["input_ids"] + eos
        if len(prompt) >= max_length:
            dropped += 1
            continue
        full = (prompt + answer)[:max_length]
        truncated += len(prompt) + len(answer) > max_length
        ids.append(full)
        labels.append([IGNORE] * len(prompt) + full[len(prompt) :])
    return Encoded(ids, labels, truncated, dropped)


def collate(encoded: Encoded, tokenizer: Any, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """The examples `rows` as one right-padded batch (transformers' DataCollatorForSeq2Seq): input_ids,
    attention_mask, and labels with IGNORE on the padding. The collator pads on the tokenizer's side."""
    from transformers import DataCollatorForSeq2Seq

    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, return_tensors="pt")(
            [{"input_ids": encoded.input_ids[r], "labels": encoded.labels[r]} for r in rows])
    finally:
        tokenizer.padding_side = side
