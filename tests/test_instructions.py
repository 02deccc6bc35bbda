"""Instruction data: formats, validation, the split and response-only labels."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from e4srec import instructions as ins
from e4srec.backbones import BackboneOptions, load_backbone
from e4srec.errors import E4SRecError
from helpers import DATA, e4srec

RECORDS = [{"instruction": f"Say {i}.", "input": "" if i % 2 else "loudly", "output": f"{i}!"} for i in range(12)]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_formats_read_alike(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(RECORDS))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    else:
        pd.DataFrame(RECORDS).to_parquet(path)
    examples = ins.read_examples(path)
    assert [(e.instruction, e.input, e.output) for e in examples] == [tuple(r.values()) for r in RECORDS]


def test_reference_data_split_holds_out_100() -> None:
    examples = ins.read_examples(DATA / "instructions.json")
    train, held = ins.split(examples, 100, seed=42)
    assert (len(train), len(held)) == (1000, 100)
    again, _ = ins.split(examples, 100, seed=42)
    assert [e.output for e in again] == [e.output for e in train]


@pytest.mark.parametrize(("record", "message"), [
    ({"instruction": "x", "output": "y"}, "data.jsonl line 2: missing field input"),
    ({"instruction": "x", "input": "", "output": "  "}, "data.jsonl line 2: empty output"),
    ({"instruction": "", "input": "", "output": "y"}, "data.jsonl line 2: empty instruction"),
])
def test_bad_records_name_the_line(tmp_path: Path, record: dict, message: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(E4SRecError, match=message):
        ins.read_examples(path)
    out = tmp_path / "out"
    result = e4srec("instruction-tune", "--instructions", path, "--output", out, "--backbone", "tiny", "--no-tracking")
    assert result.returncode == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_labels_cover_the_response_only_and_truncation_is_counted() -> None:
    tok = load_backbone(BackboneOptions(backbone="tiny")).tokenizer
    examples = [ins.Example("Name a color.", "", "Blue."), ins.Example("Repeat.", "", "word " * 400)]
    enc = ins.encode(examples, tok, max_length=120)
    ids, labels = enc.input_ids[0], enc.labels[0]
    answer = [t for t, y in zip(ids, labels) if y != ins.IGNORE]
    assert tok.decode(answer) == "Blue." + tok.eos_token
    assert labels[0] == ins.IGNORE and len(enc.input_ids[1]) == 120
    assert enc.truncated == 1 and enc.dropped == 0
    assert ins.encode(examples, tok, max_length=5).dropped == 2  # the prompt alone is longer
