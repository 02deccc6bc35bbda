"""Bad input: one line on stderr naming the file and place, exit 1, no output folder left behind."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from e4srec import contracts as c
from helpers import DATA, e4srec, write_slice


def assert_clean_failure(result, output: Path, *needles: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]  # no partial folder


@pytest.mark.parametrize(
    ("name", "content", "needles"),
    [
        ("empty.txt", "", ["empty.txt: file is empty"]),
        ("blank.txt", "\n\n", ["blank.txt: file is empty"]),
        ("token.txt", "1 2 3 4\n2 5 x7 8\n", ["token.txt line 2, token 3", "'x7' is not an integer item id"]),
        ("dup.txt", "1 2 3 4\n2 5 6 7\n1 8 9 10\n", ["dup.txt line 3", "user 1 already has a line (line 1)"]),
        ("lonely.txt", "1 2 3 4\n2\n", ["lonely.txt line 2", "user 2 has no items"]),
    ],
)
def test_s3rec_text_errors(tmp_path: Path, name: str, content: str, needles: list[str]) -> None:
    raw = tmp_path / name
    raw.write_text(content)
    out = tmp_path / "out"
    assert_clean_failure(e4srec("prepare-data", "--input", raw, "--output", out, "--no-tracking"), out, *needles)


def test_missing_column(tmp_path: Path) -> None:
    raw = tmp_path / "events.csv"
    raw.write_text("user_id,item_id,ts\nu1,a,1\n")
    out = tmp_path / "out"
    result = e4srec("prepare-data", "--input", raw, "--output", out, "--no-tracking")
    assert_clean_failure(result, out, "events.csv: missing timestamp column 'timestamp'", "(columns: user_id, item_id, ts)",
                         "--time-col")


def test_empty_value_in_table(tmp_path: Path) -> None:
    raw = tmp_path / "events.csv"
    raw.write_text("user_id,item_id,timestamp\nu1,a,1\nu1,,2\n")
    out = tmp_path / "out"
    result = e4srec("prepare-data", "--input", raw, "--output", out, "--no-tracking")
    assert_clean_failure(result, out, "events.csv line 3, column 'item_id': empty value")


def test_missing_input_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_clean_failure(e4srec("prepare-data", "--input", tmp_path / "nope.txt", "--output", out), out, "nope.txt")


def test_embeddings_from_another_item_map(tmp_path: Path, sasrec_dir: Path) -> None:
    other = write_slice(DATA / "Toys_and_Games.txt", tmp_path / "toys.txt", 300)
    assert e4srec("prepare-data", "--input", other, "--output", tmp_path / "toys", "--no-tracking").returncode == 0
    out = tmp_path / "eval"
    result = e4srec("evaluate", "--model", sasrec_dir, "--data", tmp_path / "toys", "--output", out)
    assert_clean_failure(result, out, "config.json: item-map hash", "differs from the data's")


def test_history_item_out_of_range(tmp_path: Path, prepared: Path) -> None:
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for f in prepared.iterdir():
        (tampered / f.name).write_bytes(f.read_bytes())
    table = pq.read_table(tampered / c.SEQUENCES)
    items = table.column("items").to_pylist()
    items[7] = items[7][:-1] + [99999]
    table = table.set_column(2, "items", pa.array(items, pa.list_(pa.int32())))
    pq.write_table(table, tampered / c.SEQUENCES)
    out = tmp_path / "sasrec"
    result = e4srec("pretrain-sasrec", "--data", tampered, "--output", out, "--epochs", "1", "--no-tracking")
    assert_clean_failure(result, out, "sequences.parquet row 7", "item index 99999 is out of range")


def test_non_empty_output_is_refused(tmp_path: Path, beauty_slice: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = e4srec("prepare-data", "--input", beauty_slice, "--output", out, "--no-tracking")
    assert result.returncode == 1 and "not empty" in result.stderr and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_setting_names_the_field(tmp_path: Path, prepared: Path) -> None:
    out = tmp_path / "out"
    result = e4srec("pretrain-sasrec", "--data", prepared, "--output", out, "--dropout", "1.5", "--no-tracking")
    assert_clean_failure(result, out, "PretrainSasrecConfig.dropout=1.5", "must be in [0, 1)")
