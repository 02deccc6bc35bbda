"""The bad-input table: every case is a command a user could type with one thing wrong.

Each case asserts what a user is promised: exit status 1 (2 for a malformed command line, argparse's
convention), exactly one line on stderr that names the culprit, no traceback, no output or
`.NAME.partial-*` folder left behind, and every input byte-for-byte unchanged (SHA-256 before and
after). The CLI runs in-process (`e4srec.cli.main`), so 150 cases cost seconds, not torch imports.

A case id starts with the command or input kind it exercises (raw, csv, data, sasrec, train, ...); the
table's comments group them: raw data, prepared data and artifacts, options, paths that must not be
touched, non-finite values, models and the registry.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from e4srec import contracts as c
from helpers import DATA, digest, write_slice


@dataclass
class Work:
    """Artifacts the cases point at (read-only) and a fresh scratch folder per case."""

    raw: Path  # S3-Rec slice
    data: Path  # its prepare-data output
    sasrec: Path
    e4srec: Path
    other_data: Path  # another item map (a Toys slice)
    other_sasrec: Path
    tmp: Path = field(default=Path("."))

    def copy(self, folder: Path, name: str) -> Path:
        """A writable copy of an artifact folder, to damage."""
        dst = self.tmp / name
        shutil.copytree(folder, dst)
        return dst

    def text(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return path

    def parquet(self, name: str, frame: pd.DataFrame | pa.Table) -> Path:
        path = self.tmp / name
        table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
        pq.write_table(table, path)
        return path


@pytest.fixture(scope="module")
def work(prepared: Path, sasrec_dir: Path, beauty_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> Work:
    from e4srec.stages import prepare_data, pretrain_sasrec
    from e4srec.stages import train_e4srec as stage

    root = tmp_path_factory.mktemp("bad-input-artifacts")
    e4srec_dir = root / "e4srec"
    stage.run(stage.TrainE4SRecConfig(batch_size=16, device="cpu", max_examples=32, eval_users=20), prepared,
              sasrec_dir, "tiny", e4srec_dir, progress=False)
    toys = write_slice(DATA / "Toys_and_Games.txt", root / "toys.txt", 300)
    prepare_data.run(prepare_data.PrepareDataConfig(), toys, root / "toys")
    pretrain_sasrec.run(pretrain_sasrec.PretrainSasrecConfig(epochs=1, device="cpu"), root / "toys",
                        root / "toys-sasrec", progress=False)
    return Work(beauty_slice, prepared, sasrec_dir, e4srec_dir, root / "toys", root / "toys-sasrec")


# --- helpers that make a damaged copy --------------------------------------------------------------


def with_file(w: Work, folder: Path, name: str, content: str | bytes, label: str = "damaged") -> Path:
    dst = w.copy(folder, label)
    (dst / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return dst


def truncated(w: Work, folder: Path, name: str) -> Path:
    dst = w.copy(folder, "truncated")
    blob = (dst / name).read_bytes()
    (dst / name).write_bytes(blob[: len(blob) // 2])
    return dst


def edited_json(w: Work, folder: Path, name: str, edit: Callable[[dict], None]) -> Path:
    dst = w.copy(folder, "edited")
    obj = json.loads((dst / name).read_text())
    edit(obj)
    (dst / name).write_text(json.dumps(obj))
    return dst


def nan_embedding_row(w: Work, folder: Path, row: int = 3) -> Path:
    from safetensors.torch import load_file, save_file

    from e4srec import sasrec as ps

    dst = w.copy(folder, "nan-embeddings")
    path = dst / ps.EMBEDDINGS
    with open(path, "rb") as f:  # keep the metadata (item-map hash)
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    tensors = load_file(str(path))
    tensors[ps.EMBEDDINGS_KEY][row, 0] = float("nan")
    save_file(tensors, str(path), metadata=header.get("__metadata__"))
    return dst


def new_items(w: Work, ids: list, vectors: list) -> Path:
    return w.parquet("new.parquet", pa.table({"item_id": pa.array(ids), "embedding": pa.array(vectors)}))


def vec(value: float = 0.1, n: int = 64) -> list[float]:
    return [value] * n


def s3rec(w: Work, text: str, name: str = "raw.txt") -> Path:
    return w.text(name, text)


def csv(w: Work, text: str, name: str = "events.csv") -> Path:
    return w.text(name, text)


GOOD_ROWS = "".join(f"u{u},i{(u * 7 + k) % 13},{k}\n" for u in range(6) for k in range(5))
N = "--no-tracking"


# --- the table ---------------------------------------------------------------------------------------
# (id, build(w) -> (argv, output or None, inputs), needles in the one stderr line[, exit status])

Case = tuple[str, Callable[[Work], tuple[list, Path | None, list[Path]]], list[str]]


def prep(raw_path: Callable[[Work], Path], *extra: str) -> Callable[[Work], tuple[list, Path, list[Path]]]:
    def build(w: Work) -> tuple[list, Path, list[Path]]:
        path = raw_path(w)
        out = w.tmp / "out"
        return ["prepare-data", "--input", path, "--output", out, N, *extra], out, [path]

    return build


def sasrec(data: Callable[[Work], Path], *extra: str) -> Callable[[Work], tuple[list, Path, list[Path]]]:
    def build(w: Work) -> tuple[list, Path, list[Path]]:
        d = data(w)
        out = w.tmp / "out"
        return ["pretrain-sasrec", "--data", d, "--output", out, "--epochs", "1", "--device", "cpu", N, *extra], out, [d]

    return build


def train(*extra: str, data: Callable[[Work], Path] | None = None, table: Callable[[Work], Path] | None = None,
          backbone: str | Callable[[Work], Path] = "tiny") -> Callable[[Work], tuple[list, Path, list[Path]]]:
    def build(w: Work) -> tuple[list, Path, list[Path]]:
        d = data(w) if data else w.data
        s = table(w) if table else w.sasrec
        m = backbone(w) if callable(backbone) else backbone
        out = w.tmp / "out"
        argv = ["train-e4srec", "--data", d, "--sasrec", s, "--backbone", m, "--output", out, "--max-examples", "8",
                "--eval-users", "5", "--device", "cpu", N, *[a.format(tmp=w.tmp, data=d) for a in extra]]
        return argv, out, [d, s] + ([m] if isinstance(m, Path) else [])

    return build


def tune(*extra: str, instructions: Callable[[Work], Path] | None = None) -> Callable:
    def build(w: Work) -> tuple[list, Path, list[Path]]:
        out = w.tmp / "out"
        argv = ["instruction-tune", "--output", out, "--backbone", "tiny", "--device", "cpu", N, *extra]
        inputs = []
        if instructions:
            path = instructions(w)
            argv += ["--instructions", path]
            inputs.append(path)
        return argv, out, inputs

    return build


def evaluate(model: Callable[[Work], Path], data: Callable[[Work], Path] | None = None) -> Callable:
    def build(w: Work) -> tuple[list, Path, list[Path]]:
        m, d = model(w), (data(w) if data else w.data)
        out = w.tmp / "out"
        return ["evaluate", "--model", m, "--data", d, "--output", out], out, [m, d]

    return build


def extend(items: Callable[[Work], Path], model: Callable[[Work], Path] | None = None) -> Callable:
    def build(w: Work) -> tuple[list, Path, list[Path]]:
        m = model(w) if model else w.e4srec
        p = items(w)
        out = w.tmp / "out"
        return ["extend-items", "--model", m, "--new-items", p, "--output", out], out, [m, p]

    return build


def batch(*extra: str, model: Callable[[Work], Path] | None = None, data: Callable[[Work], Path] | None = None) -> Callable:
    def build(w: Work) -> tuple[list, Path, list[Path]]:
        m, d = (model(w) if model else w.sasrec), (data(w) if data else w.data)
        out = w.tmp / "out"
        return ["batch-recommend", "--model", m, "--data", d, "--output", out, "--max-users", "5", N, *extra], out, [m, d]

    return build


def recommend(*extra: str, model: Callable[[Work], Path | str] | None = None) -> Callable:
    def build(w: Work) -> tuple[list, None, list[Path]]:
        m = model(w) if model else w.sasrec
        return ["recommend", "--model", m, *extra], None, [m] if isinstance(m, Path) else []

    return build


def report(*extra: str, e4srec: Callable[[Work], Path] | None = None, data: Callable[[Work], Path] | None = None) -> Callable:
    def build(w: Work) -> tuple[list, Path, list[Path]]:
        d, e = (data(w) if data else w.data), (e4srec(w) if e4srec else w.e4srec)
        out = w.tmp / "out"
        argv = ["report", "--data", d, "--sasrec", w.sasrec, "--e4srec", e, "--output", out, N,
                *[a.format(tmp=w.tmp, data=d) for a in extra]]
        return argv, out, [d, w.sasrec, e]

    return build


def deploy(*extra: str, model: Callable[[Work], Path] | None = None) -> Callable:
    def build(w: Work) -> tuple[list, Path, list[Path]]:
        m = model(w) if model else w.e4srec
        out = w.tmp / "out"
        return ["deploy", "--model", m, "--sasrec", w.sasrec, "--data", w.data, "--output", out, *extra], out, \
            [m, w.sasrec, w.data]

    return build


def promote(*extra: str) -> Callable:
    return lambda w: (["promote", *extra], None, [])


def run_cmd(*extra: str, raw: Callable[[Work], Path] | None = None) -> Callable:
    def build(w: Work) -> tuple[list, Path, list[Path]]:
        r = raw(w) if raw else w.raw
        root = w.tmp / "runs"
        return ["run", "--input", r, "--pipeline-root", root, "--backbone", "tiny", N, *extra], root, [r]

    return build


def same_as(flag_value: Callable[[Work], Path], build: Callable) -> Callable:
    """Replace the case's --output by an input (the stage must refuse to write where it reads)."""
    def wrapped(w: Work) -> tuple[list, Path | None, list[Path]]:
        argv, _, inputs = build(w)
        target = flag_value(w)
        i = argv.index("--output")
        argv[i + 1] = target
        return argv + ["--overwrite"], None, inputs

    return wrapped


def user_folder(w: Work) -> Path:
    folder = w.tmp / "my-notes"
    folder.mkdir(exist_ok=True)
    (folder / "thesis.txt").write_text("do not delete")
    return folder


def user_file(w: Work) -> Path:
    return w.text("my-file.txt", "do not rename")


def with_user_path(path: Callable[[Work], Path], build: Callable, flag: str) -> Callable:
    def wrapped(w: Work) -> tuple[list, Path | None, list[Path]]:
        target = path(w)
        argv, out, inputs = build(w)
        return argv + [flag, target], out, inputs + [target]

    return wrapped


def corrupt_checkpoint(w: Work) -> Path:
    root = w.tmp / "ckpt"
    root.mkdir()
    (root / "e4srec-checkpoint.json").write_text('{"stage": "train-e4srec", "format": 1}')
    (root / "progress.json").write_text('{"epoch": 0, "batch": 1, "step": 1, "log": []}')
    (root / "trainable.safetensors").write_bytes(b"\x00" * 40)
    return root


CLUSTER_PROFILE = Path(__file__).resolve().parents[1] / "pipelines" / "profiles" / "cluster.yaml"


def compile_with(profile: Callable[[Work], Path]) -> Callable:
    """`compile` with a profile YAML: the profile is an input, the pipeline spec the output."""
    def build(w: Work) -> tuple[list, Path, list[Path]]:
        path = profile(w)
        return ["compile", "--profile", path, "--output", w.tmp / "pipeline.yaml"], w.tmp / "pipeline.yaml", [path]

    return build


def profile_text(text: str | bytes) -> Callable[[Work], Path]:
    return lambda w: w.text("my-cluster.yaml", text)


def profile_edit(old: str, new: str) -> Callable[[Work], Path]:
    """The shipped cluster profile with one line changed (so that every other field is valid)."""
    def make(w: Work) -> Path:
        text = CLUSTER_PROFILE.read_text()
        assert old in text, old
        return w.text("my-cluster.yaml", text.replace(old, new, 1))

    return make


def rerun_cmd(stage: str, *extra: str, record: str | None = None) -> Callable:
    """`rerun STAGE --from` a run folder, with --set values; the folder is empty (the pipeline's defaults
    apply) or holds `record` as its pipeline_run.json."""
    def build(w: Work) -> tuple[list, Path, list[Path]]:
        run = w.tmp / "runs" / "e4srec-earlier"
        run.mkdir(parents=True)
        if record is not None:
            (run / "pipeline_run.json").write_text(record)
        root = w.tmp / "rerun-root"
        return ["rerun", stage, "--from", run, "--pipeline-root", root, *extra], root, [run]

    return build


CASES: list[Case] = [
    # raw data: the S3-Rec text format
    ("raw-empty", prep(lambda w: s3rec(w, "")), ["raw.txt: file is empty"]),
    ("raw-blank-lines", prep(lambda w: s3rec(w, "\n \n\t\n")), ["raw.txt: file is empty"]),
    ("raw-letter-token", prep(lambda w: s3rec(w, "1 2 3 4\n2 5 x7 8\n")), ["line 2, token 3", "'x7'"]),
    ("raw-negative-id", prep(lambda w: s3rec(w, "1 2 -3 4\n")), ["line 1, token 3", "'-3'"]),
    ("raw-float-id", prep(lambda w: s3rec(w, "1 2 3.5 4\n")), ["line 1, token 3", "'3.5'"]),
    ("raw-arabic-digits", prep(lambda w: s3rec(w, "1 2 3 4\n2 \u0663\u0664 5 6\n")), ["line 2, token 2", "0-9"]),
    ("raw-superscript", prep(lambda w: s3rec(w, "1 2 3 \u00b2\n")), ["line 1, token 4"]),
    ("raw-item-zero", prep(lambda w: s3rec(w, "1 2 3 4\n2 0 5 6\n")), ["line 2, token 2", "item id 0", "from 1"]),
    ("raw-duplicate-user", prep(lambda w: s3rec(w, "1 2 3 4\n2 5 6 7\n1 8 9 10\n")), ["line 3", "user 1 already"]),
    ("raw-user-no-items", prep(lambda w: s3rec(w, "1 2 3 4\n2\n")), ["line 2", "user 2 has no items"]),
    ("raw-binary", prep(lambda w: w.text("raw.bin", b"\x89PNG\r\n\x1a\n\x00\xff\xfe")), ["raw.bin", "not UTF-8"]),
    ("raw-latin1", prep(lambda w: w.text("raw.txt", "1 2 3 4 caf\xe9\n".encode("latin-1"))), ["raw.txt", "not UTF-8"]),
    ("raw-missing", prep(lambda w: w.tmp / "nope.txt"), ["nope.txt", "not found"]),
    ("raw-is-folder", prep(lambda w: (w.tmp / "raw.d").mkdir() or w.tmp / "raw.d"), ["raw.d", "is a folder"]),
    ("raw-all-users-short", prep(lambda w: s3rec(w, "1 2 3\n2 4 5\n3 6 7\n")),
     ["no user has the 3 interactions"]),
    ("raw-kcore-empties", prep(lambda w: s3rec(w, "1 2 3 4\n2 5 6 7\n"), "--k-core", "5"),
     ["nothing is left after the 5-core filter"]),
    ("raw-too-few-negatives", prep(lambda w: s3rec(w, "1 1 2 3\n2 2 3 1\n3 3 1 2\n")), ["fewer than 99 remain",
                                                                                      "--n-negatives"]),
    # raw data: interaction tables
    ("csv-no-user-col", prep(lambda w: csv(w, "customer,item_id,timestamp\nu1,a,1\n")), ["missing user column",
                                                                                       "--user-col"]),
    ("csv-no-item-col", prep(lambda w: csv(w, "user_id,product,timestamp\nu1,a,1\n")), ["missing item column",
                                                                                      "--item-col"]),
    ("csv-no-time-col", prep(lambda w: csv(w, "user_id,item_id,ts\nu1,a,1\n")), ["missing timestamp column",
                                                                               "--time-col"]),
    ("csv-empty-item", prep(lambda w: csv(w, "user_id,item_id,timestamp\nu1,a,1\nu1,,2\n")),
     ["line 3, column 'item_id': empty value"]),
    ("csv-blank-user", prep(lambda w: csv(w, "user_id,item_id,timestamp\nu1,a,1\n  ,b,2\n")),
     ["line 3, column 'user_id': empty value"]),
    ("csv-empty-time", prep(lambda w: csv(w, "user_id,item_id,timestamp\nu1,a,1\nu1,b,\n")),
     ["line 3, column 'timestamp': empty value"]),
    ("csv-bad-time", prep(lambda w: csv(w, "user_id,item_id,timestamp\nu1,a,2020-01-01\nu1,b,yesterday\n")),
     ["line 3, column 'timestamp'", "'yesterday'"]),
    ("csv-empty-file", prep(lambda w: csv(w, "")), ["events.csv: file is empty"]),
    ("csv-header-only", prep(lambda w: csv(w, "user_id,item_id,timestamp\n")), ["header but no rows"]),
    ("csv-duplicate-column", prep(lambda w: csv(w, "user_id,item_id,item_id,timestamp\nu1,a,b,1\n")),
     ["'item_id' appears 2 times"]),
    ("tsv-with-commas", prep(lambda w: csv(w, "user_id,item_id,timestamp\nu1,a,1\n", "events.tsv")),
     ["separated by commas", ".tsv file by tabs"]),
    ("csv-with-tabs", prep(lambda w: csv(w, "user_id\titem_id\ttimestamp\nu1\ta\t1\n")),
     ["separated by tabs", ".csv file by commas"]),
    ("csv-with-semicolons", prep(lambda w: csv(w, "user_id;item_id;timestamp\nu1;a;1\n")), ["semicolons"]),
    ("csv-ragged-row", prep(lambda w: csv(w, "user_id,item_id,timestamp\nu1,a,1\nu1,b,2,9\n")), ["events.csv",
                                                                                                  "cannot read"]),
    ("parquet-garbage", prep(lambda w: w.text("events.parquet", b"not parquet at all")), ["events.parquet",
                                                                                           "cannot read"]),
    ("parquet-no-item", prep(lambda w: w.parquet("events.parquet", pd.DataFrame({"user_id": ["u"], "timestamp": [1]}))),
     ["missing item column"]),
    ("parquet-null-item", prep(lambda w: w.parquet("events.parquet", pd.DataFrame(
        {"user_id": ["u", "u"], "item_id": ["a", None], "timestamp": [1, 2]}))), ["row 1, column 'item_id'"]),
    ("parquet-nan-time", prep(lambda w: w.parquet("events.parquet", pd.DataFrame(
        {"user_id": ["u", "u"], "item_id": ["a", "b"], "timestamp": [1.0, float("nan")]}))),
     ["row 1, column 'timestamp'"]),
    ("parquet-inf-time", prep(lambda w: w.parquet("events.parquet", pd.DataFrame(
        {"user_id": ["u", "u"], "item_id": ["a", "b"], "timestamp": [1.0, float("inf")]}))),
     ["row 1, column 'timestamp'", "not a finite"]),
    # prepare-data options
    ("prep-max-len-0", prep(lambda w: w.raw, "--max-len", "0"), ["max_len=0", "must be in [1, 4096]"]),
    ("prep-max-len-huge", prep(lambda w: w.raw, "--max-len", "100000000"), ["max_len=100000000", "[1, 4096]"]),
    ("prep-kcore-negative", prep(lambda w: w.raw, "--k-core", "-1"), ["k_core=-1"]),
    ("prep-negatives-0", prep(lambda w: w.raw, "--n-negatives", "0"), ["n_negatives=0"]),
    ("prep-seed-negative", prep(lambda w: w.raw, "--seed", "-1"), ["seed=-1", "[0, 2**32)"]),
    ("prep-seed-huge", prep(lambda w: w.raw, "--seed", str(2**40)), ["seed=", "[0, 2**32)"]),
    ("prep-csv-with-unknown-user-col", prep(lambda w: csv(w, "user_id,item_id,timestamp\n" + GOOD_ROWS), "--user-col",
                                            "customer"), ["missing user column 'customer'"]),
    # prepared data and artifacts
    ("data-missing", sasrec(lambda w: w.tmp / "nowhere"), ["nowhere"]),
    ("data-empty-folder", sasrec(lambda w: (w.tmp / "empty").mkdir() or w.tmp / "empty"), ["empty"]),
    ("data-manifest-not-json", sasrec(lambda w: with_file(w, w.data, c.MANIFEST, "{not json")), ["manifest.json",
                                                                                              "invalid JSON"]),
    ("data-manifest-list", sasrec(lambda w: with_file(w, w.data, c.MANIFEST, "[1, 2]")), ["manifest.json"]),
    ("data-manifest-wrong-type", sasrec(lambda w: edited_json(w, w.data, c.MANIFEST,
                                                              lambda m: m.update(max_len="fifty"))),
     ["manifest.json", "max_len"]),
    ("data-manifest-no-hash", sasrec(lambda w: edited_json(w, w.data, c.MANIFEST, lambda m: m.pop("item_map_sha256"))),
     ["manifest.json", "item_map_sha256"]),
    ("data-sequences-truncated", sasrec(lambda w: truncated(w, w.data, c.SEQUENCES)), [c.SEQUENCES]),
    ("data-item-map-truncated", sasrec(lambda w: truncated(w, w.data, c.ITEM_MAP)), [c.ITEM_MAP]),
    ("data-sequences-missing", sasrec(lambda w: (lambda d: (d / c.SEQUENCES).unlink() or d)(w.copy(w.data, "d"))),
     [c.SEQUENCES]),
    ("data-item-map-shuffled", sasrec(lambda w: shuffled_item_map(w)), ["item-map hash"]),
    ("data-item-out-of-range", sasrec(lambda w: tampered_items(w, 99999)), ["row 7", "item index 99999"]),
    ("data-item-negative", sasrec(lambda w: tampered_items(w, -4)), ["row 7", "item index -4"]),
    ("data-bce-user-has-every-item", sasrec(lambda w: every_item_data(w)), ["holds all", "--loss ce"]),
    # pretrain-sasrec options
    ("sasrec-dropout-1.5", sasrec(lambda w: w.data, "--dropout", "1.5"), ["dropout=1.5", "[0, 1)"]),
    ("sasrec-dropout-nan", sasrec(lambda w: w.data, "--dropout", "nan"), ["dropout=nan", "finite"]),
    ("sasrec-lr-inf", sasrec(lambda w: w.data, "--lr", "inf"), ["lr=inf", "finite"]),
    ("sasrec-lr-zero", sasrec(lambda w: w.data, "--lr", "0"), ["lr=0.0", "> 0"]),
    ("sasrec-lr-negative", sasrec(lambda w: w.data, "--lr", "-0.1"), ["lr=-0.1"]),
    ("sasrec-weight-decay-negative", sasrec(lambda w: w.data, "--weight-decay", "-1"), ["weight_decay=-1.0"]),
    ("sasrec-epochs-0", sasrec(lambda w: w.data, "--epochs", "0"), ["epochs=0"]),
    ("sasrec-batch-0", sasrec(lambda w: w.data, "--batch-size", "0"), ["batch_size=0"]),
    ("sasrec-heads-indivisible", sasrec(lambda w: w.data, "--dim", "63", "--n-heads", "2"), ["dim=63", "divisible"]),
    ("sasrec-blocks-0", sasrec(lambda w: w.data, "--n-blocks", "0"), ["n_blocks=0"]),
    ("sasrec-patience-0", sasrec(lambda w: w.data, "--patience", "0"), ["patience=0"]),
    ("sasrec-seed-negative", sasrec(lambda w: w.data, "--seed", "-3"), ["seed=-3"]),
    ("sasrec-threads-negative", sasrec(lambda w: w.data, "--threads", "-1"), ["threads=-1"]),
    ("sasrec-device-bogus", sasrec(lambda w: w.data, "--device", "tpu"), ["tpu"]),
    ("sasrec-device-missing-cuda", sasrec(lambda w: w.data, "--device", "cuda:7"), ["cuda"]),
    ("sasrec-eval-every-0", sasrec(lambda w: w.data, "--eval-every", "0"), ["eval_every=0"]),
    # paths a stage must not touch
    ("sasrec-output-is-data", same_as(lambda w: w.data, sasrec(lambda w: w.data)), ["overlaps the input --data"]),
    ("sasrec-output-inside-data", same_as(lambda w: w.data / "sub", sasrec(lambda w: w.data)),
     ["overlaps the input --data"]),
    ("sasrec-output-holds-data", same_as(lambda w: w.data.parent, sasrec(lambda w: w.data)),
     ["overlaps the input --data"]),
    ("prep-output-is-input-file", same_as(lambda w: w.raw, prep(lambda w: w.raw)), ["overlaps the input --input"]),
    ("prep-output-holds-input", same_as(lambda w: w.raw.parent, prep(lambda w: w.raw)), ["overlaps the input --input"]),
    ("prep-output-is-a-file", lambda w: (["prepare-data", "--input", w.raw, "--output", user_file(w), N], None,
                                         [w.raw, w.tmp / "my-file.txt"]), ["exists and is a file"]),
    ("prep-output-under-a-file", lambda w: (["prepare-data", "--input", w.raw, "--output", user_file(w) / "x", N],
                                            None, [w.raw, w.tmp / "my-file.txt"]), ["is a file"]),
    ("prep-output-not-empty", lambda w: (["prepare-data", "--input", w.raw, "--output", user_folder(w), N], None,
                                         [w.raw, w.tmp / "my-notes"]), ["not empty", "--overwrite"]),
    ("train-output-is-sasrec", same_as(lambda w: w.sasrec, train()), ["overlaps the input --sasrec"]),
    ("train-checkpoint-dir-user-folder", with_user_path(user_folder, train("--checkpoint-every", "1"),
                                                        "--checkpoint-dir"), ["not train-e4srec checkpoints"]),
    ("train-checkpoint-dir-user-file", with_user_path(user_file, train("--checkpoint-every", "1"),
                                                      "--checkpoint-dir"), ["is a file"]),
    ("train-checkpoint-dir-is-data", train("--checkpoint-every", "1", "--checkpoint-dir", "{data}"),
     ["checkpoint folder", "overlaps the input --data"]),
    ("train-resume-corrupt", with_user_path(corrupt_checkpoint, train("--resume"), "--checkpoint-dir"),
     ["trainable.safetensors", "not a readable safetensors"]),
    ("eval-output-is-model", same_as(lambda w: w.sasrec, evaluate(lambda w: w.sasrec)), ["overlaps the input --model"]),
    ("extend-output-is-model", same_as(lambda w: w.e4srec, extend(lambda w: new_items(w, ["n1"], [vec()]))),
     ["overlaps the input --model"]),
    ("batch-output-is-data", same_as(lambda w: w.data, batch()), ["overlaps the input --data"]),
    ("report-output-is-e4srec", same_as(lambda w: w.e4srec, report()), ["overlaps the input --e4srec"]),
    ("deploy-output-is-model", same_as(lambda w: w.e4srec, deploy()), ["overlaps the input --model"]),
    ("tune-output-is-instructions", same_as(lambda w: w.tmp / "inst.json",
                                            tune(instructions=lambda w: w.text("inst.json", "[]"))),
     ["overlaps the input --instructions"]),
    # instruction-tune
    ("tune-no-instructions", tune(), ["--instructions"]),
    ("tune-instructions-missing", tune(instructions=lambda w: w.tmp / "none.json"), ["none.json"]),
    ("tune-instructions-not-json", tune(instructions=lambda w: w.text("inst.json", "[{")), ["inst.json"]),
    ("tune-instructions-not-list", tune(instructions=lambda w: w.text("inst.json", "42")), ["inst.json"]),
    ("tune-instructions-no-output", tune(instructions=lambda w: w.text("inst.json", json.dumps(
        [{"instruction": "say hi"}] * 5))), ["inst.json", "output"]),
    ("tune-instructions-empty", tune(instructions=lambda w: w.text("inst.json", "[]")), ["inst.json"]),
    ("tune-lora-dropout-1", tune("--skip", "--lora-dropout", "1"), ["lora_dropout=1.0"]),
    ("tune-target-modules-empty", tune("--skip", "--target-modules", " , "), ["target_modules"]),
    ("tune-target-modules-unknown", tune("--target-modules", "no_such_proj", "--holdout", "2", instructions=lambda w: w.text(
        "inst.json", json.dumps([{"instruction": "say hi", "input": "", "output": "hi"}] * 8))),
     ["target_modules='no_such_proj'"]),
    ("tune-backbone-unknown", tune("--skip", "--backbone", "llama-99b"), ["llama-99b"]),
    ("tune-backbone-gguf-missing", tune("--skip", "--backbone", "gguf:/no/such.gguf"), ["/no/such.gguf"]),
    ("tune-lr-nan", tune("--skip", "--lr", "nan"), ["lr=nan"]),
    ("tune-weight-decay-negative", tune("--skip", "--weight-decay", "-0.1"), ["weight_decay=-0.1"]),
    ("tune-merge-quantized", tune("--skip", "--merge", "--quantization", "nf4"), ["merge"]),
    ("tune-max-length-0", tune("--skip", "--max-length", "0"), ["max_length=0"]),
    ("tune-holdout-negative", tune("--skip", "--holdout", "-1"), ["holdout=-1"]),
    # train-e4srec
    ("train-table-other-item-map", train(table=lambda w: w.other_sasrec), ["item-map hash"]),
    ("train-table-missing", train(table=lambda w: w.tmp / "nope"), ["nope"]),
    ("train-table-nan-row", train(table=lambda w: nan_embedding_row(w, w.sasrec)), ["row 3", "not finite"]),
    ("train-table-truncated", train(table=lambda w: truncated(w, w.sasrec, "item_embeddings.safetensors")),
     ["item_embeddings.safetensors"]),
    ("train-lr-inf", train("--lr", "inf"), ["lr=inf"]),
    ("train-lr-nan", train("--lr", "nan"), ["lr=nan"]),
    ("train-max-grad-norm-0", train("--max-grad-norm", "0"), ["max_grad_norm=0.0"]),
    ("train-max-grad-norm-negative", train("--max-grad-norm", "-1"), ["max_grad_norm=-1.0"]),
    ("train-weight-decay-negative", train("--weight-decay", "-1"), ["weight_decay=-1.0"]),
    ("train-warmup-1", train("--warmup-ratio", "1"), ["warmup_ratio=1.0"]),
    ("train-lora-dropout-2", train("--lora-dropout", "2"), ["lora_dropout=2.0"]),
    ("train-lora-r-0", train("--lora-r", "0"), ["lora_r=0"]),
    ("train-autocast-fp32", train("--dtype", "fp32", "--autocast"), ["--autocast on CPU needs a bf16 backbone",
                                                                     "--dtype bf16"]),
    ("train-target-modules-unknown", train("--target-modules", "q_proj_typo"), ["target_modules='q_proj_typo'"]),
    ("train-target-modules-empty", train("--target-modules", ","), ["target_modules"]),
    ("train-item-dim-mismatch", train("--item-dim", "32"), ["64-dimensional", "--item-dim"]),
    ("train-epochs-0", train("--epochs", "0"), ["epochs=0"]),
    ("train-seed-negative", train("--seed", "-5"), ["seed=-5"]),
    ("train-eval-batch-0", train("--eval-batch-size", "0"), ["eval_batch_size=0"]),
    ("train-max-examples-negative", train("--max-examples", "-1"), ["max_examples=-1"]),
    ("train-checkpoint-every-negative", train("--checkpoint-every", "-1"), ["checkpoint_every=-1"]),
    ("train-backbone-missing-folder", train(backbone="/no/such/folder"), ["/no/such/folder"]),
    ("train-backbone-unknown-name", train(backbone="gpt-17"), ["gpt-17"]),
    ("train-data-other-item-map", train(data=lambda w: w.other_data), ["item-map hash"]),
    ("train-backbone-descriptor-not-json", train(backbone=lambda w: backbone_folder(w, "{")), ["backbone.json", "invalid JSON"]),
    ("train-backbone-descriptor-wrong-type", train(backbone=lambda w: backbone_folder(w, local_files_only="yes")),
     ["backbone.json", "'local_files_only' is 'yes', expected bool"]),
    ("train-backbone-descriptor-no-backbone", train(backbone=lambda w: backbone_folder(w, backbone=None)),
     ["backbone.json", "missing field 'backbone'"]),
    ("train-backbone-adapter-missing", train(backbone=lambda w: backbone_folder(w, adapter="adapter")),
     ["backbone.json", "field 'adapter'", "not a folder"]),
    ("train-backbone-unknown-quantization", train(backbone=lambda w: backbone_folder(w, quantization="int3")), ["int3"]),
    ("train-backbone-cache-damaged", train(backbone=lambda w: damaged_tiny_cache(w)),
     ["cached copy", "looks damaged", "delete that folder"]),
    ("train-run-id-unset", train("--checkpoint-every", "1", "--checkpoint-dir", "{tmp}/ck-{{run_id}}"),
     ["E4SREC_PIPELINE_RUN_ID"]),
    # evaluate
    ("eval-model-other-data", evaluate(lambda w: w.sasrec, lambda w: w.other_data), ["item-map hash"]),
    ("eval-model-missing", evaluate(lambda w: w.tmp / "gone"), ["gone"]),
    ("eval-config-not-json", evaluate(lambda w: with_file(w, w.sasrec, "config.json", "{{")), ["config.json",
                                                                                              "invalid JSON"]),
    ("eval-config-bad-model", evaluate(lambda w: edited_json(w, w.sasrec, "config.json",
                                                             lambda m: m["model"].update(n_blocks="two"))),
     ["config.json"]),
    ("eval-config-unknown-field", evaluate(lambda w: edited_json(w, w.sasrec, "config.json",
                                                                 lambda m: m["model"].update(colour=1))),
     ["config.json", "colour"]),
    ("eval-weights-truncated", evaluate(lambda w: truncated(w, w.sasrec, "model.safetensors")),
     ["model.safetensors", "not a readable safetensors"]),
    ("eval-weights-foreign", evaluate(lambda w: with_file(w, w.sasrec, "model.safetensors", b"PK\x03\x04zip")),
     ["model.safetensors"]),
    ("eval-weights-wrong-shape", evaluate(lambda w: edited_json(w, w.sasrec, "config.json",
                                                                lambda m: m["model"].update(dim=32))),
     ["model.safetensors", "does not fit"]),
    # extend-items: new items
    ("extend-nan-embedding", extend(lambda w: new_items(w, ["n1", "n2"], [vec(), vec(float("nan"))])),
     ["row 1", "NaN or infinite"]),
    ("extend-inf-embedding", extend(lambda w: new_items(w, ["n1"], [[float("inf")] + vec(n=63)])),
     ["row 0", "NaN or infinite"]),
    ("extend-null-in-embedding", extend(lambda w: new_items(w, ["n1"], [[None] + vec(n=63)])), ["row 0", "null"]),
    ("extend-null-id", extend(lambda w: new_items(w, [None], [vec()])), ["row 0", "item_id is null"]),
    ("extend-empty-id", extend(lambda w: new_items(w, ["n1", "  "], [vec(), vec()])), ["row 1", "item_id is empty"]),
    ("extend-known-id", extend(lambda w: new_items(w, [first_item(w)], [vec()])), ["row 0", "already in the model"]),
    ("extend-duplicate-id", extend(lambda w: new_items(w, ["n1", "n1"], [vec(), vec()])), ["row 1", "already"]),
    ("extend-short-embedding", extend(lambda w: new_items(w, ["n1"], [vec(n=10)])), ["row 0", "length 10"]),
    ("extend-null-embedding", extend(lambda w: new_items(w, ["n1"], pa.array([None], pa.list_(pa.float64())))),
     ["row 0", "length 0"]),
    ("extend-not-parquet", extend(lambda w: w.text("new.parquet", "item_id,embedding\n")), ["new.parquet",
                                                                                         "not a readable Parquet"]),
    ("extend-missing-column", extend(lambda w: w.parquet("new.parquet", pd.DataFrame({"item_id": ["a"]}))),
     ["missing column 'embedding'"]),
    ("extend-no-rows", extend(lambda w: new_items(w, pa.array([], pa.string()), pa.array([], pa.list_(pa.float64())))),
     ["no rows"]),
    ("extend-file-missing", extend(lambda w: w.tmp / "none.parquet"), ["none.parquet", "not found"]),
    ("extend-model-is-sasrec", extend(lambda w: new_items(w, ["n1"], [vec()]), model=lambda w: w.sasrec),
     ["a SASRec model", "train-e4srec output"]),
    ("extend-head-truncated", extend(lambda w: new_items(w, ["n1"], [vec()]),
                                     model=lambda w: truncated(w, w.e4srec, "head_proj.safetensors")), ["head_proj.safetensors"]),
    # batch-recommend, recommend
    ("batch-k-0", batch("--k", "0"), ["k=0"]),
    ("batch-size-0", batch("--batch-size", "0"), ["batch_size=0"]),
    ("batch-max-users-negative", batch("--max-users", "-1"), ["max_users=-1"]),
    ("batch-other-item-map", batch(data=lambda w: w.other_data), ["another item map"]),
    ("batch-model-missing", batch(model=lambda w: w.tmp / "gone"), ["gone"]),
    ("recommend-k-0", recommend("--k", "0", "--history", "1"), ["k"]),
    ("recommend-k-negative", recommend("--k", "-3", "--history", "1"), ["k"]),
    ("recommend-model-missing", recommend(model=lambda w: w.tmp / "gone"), ["gone"]),
    ("recommend-item-map-shuffled", recommend("--history", "1", model=lambda w: shuffled_item_map(w, w.sasrec)),
     ["item_map.parquet", "item-map hash", "was changed"]),
    ("recommend-unknown-registered-model", recommend(model=lambda w: "models:/no-such-model@champion"),
     ["no-such-model"]),
    ("recommend-bad-model-uri", recommend(model=lambda w: "models:/"), ["models:/"]),
    # report, deploy, promote
    ("report-verdict-missing", report("--verdict", "{tmp}/no-verdict"), ["no-verdict"]),
    ("report-e4srec-other-data", report(data=lambda w: w.other_data), ["item-map hash"]),
    ("deploy-metric-bogus", deploy("--metric", "test/full/NDCG@11"), ["metric"]),
    ("deploy-metric-split", deploy("--metric", "train/full/NDCG@10"), ["metric"]),
    ("deploy-margin-negative", deploy("--min-margin", "-1"), ["min_margin=-1.0"]),
    ("deploy-margin-nan", deploy("--min-margin", "nan"), ["min_margin=nan"]),
    ("deploy-model-is-sasrec", deploy(model=lambda w: w.sasrec), ["a SASRec model where the E4SRec model belongs"]),
    ("promote-history-unknown", promote("no-such-model", "--history"), ["no-such-model", "no registered model"]),
    ("submit-host-without-scheme", lambda w: (["submit", "--input", "s3://b/raw.txt", "--host", "127.0.0.1:9"], None, []),
     ["--host", "http://127.0.0.1:9"]),
    ("submit-lr-nan", lambda w: (["submit", "--input", "s3://b/raw.txt", "--host", "http://127.0.0.1:9", "--e4srec-lr",
                                  "nan"], None, []), ["lr=nan"]),
    ("promote-unknown-model", promote("no-such-model", "--version", "1"), ["no-such-model"]),
    ("promote-rollback-unknown", promote("no-such-model", "--rollback"), ["no-such-model"]),
    # environment profiles (compile, submit, rerun --profile)
    ("profile-not-a-mapping", compile_with(profile_text("- name: cluster\n")), ["my-cluster.yaml", "a mapping",
                                                                                "got a list"]),
    ("profile-invalid-yaml", compile_with(profile_text("name: [cluster\n")), ["my-cluster.yaml", "invalid YAML"]),
    ("profile-not-utf8", compile_with(profile_text(b"name: \xff\xfe\n")), ["my-cluster.yaml", "not UTF-8"]),
    ("profile-unknown-field", compile_with(profile_edit("name: cluster", "name: cluster\nimages: x")),
     ["unknown field(s) images"]),
    ("profile-missing-image", compile_with(profile_text("name: x\ngpu_image: y\n")), ["missing field 'image'"]),
    ("profile-image-number", compile_with(profile_edit("image: registry.example.com/e4srec/e4srec-cpu:{version}",
                                                       "image: 42")), ["image:", "expected a string", "int 42"]),
    ("profile-image-stray-brace", compile_with(profile_edit("e4srec-cpu:{version}", "e4srec-cpu:{tag}")),
     ["image:", "only {version}"]),
    ("profile-env-bool", compile_with(profile_edit("AWS_DEFAULT_REGION: us-east-1", "AWS_DEFAULT_REGION: true")),
     ["env.AWS_DEFAULT_REGION", "quote"]),
    ("profile-env-list", compile_with(profile_edit("env:\n", "env: [a]\nold_env:\n")), ["unknown field(s) old_env"]),
    ("profile-secret-no-env", compile_with(profile_edit("  - name: e4srec-s3-credentials\n    env:",
                                                        "  - name: e4srec-s3-credentials\n    envs:")),
     ["secrets[0]", "needs a name and an env"]),
    ("profile-secret-optional-string", compile_with(profile_edit("optional: true", "optional: maybe")),
     ["secrets[1].optional", "true or false"]),
    ("profile-gpu-stage-unknown", compile_with(profile_edit("stages: [instruction-tune,", "stages: [train-sasrec,")),
     ["gpu.stages[0]", "train-sasrec"]),
    ("profile-gpu-count-0", compile_with(profile_edit("count: 1", "count: 0")), ["gpu.count", ">= 1"]),
    ("profile-gpu-count-string", compile_with(profile_edit("count: 1", "count: one")), ["gpu.count", "'one'"]),
    ("profile-gpu-no-accelerator", compile_with(profile_edit("  accelerator: nvidia.com/gpu\n", "")),
     ["gpu.accelerator", "missing"]),
    ("profile-toleration-unknown-key", compile_with(profile_edit("effect: NoSchedule}", "effects: NoSchedule}")),
     ["gpu.tolerations[0]", "effects"]),
    ("profile-node-selector-bool", compile_with(profile_edit('nvidia.com/gpu.present: "true"',
                                                             "nvidia.com/gpu.present: true")),
     ["gpu.node_selector.nvidia.com/gpu.present", "quote"]),
    ("profile-pod-retries-string", compile_with(profile_edit("retries: 2}", "retries: two}")),
     ["pods.default.retries", "'two'"]),
    ("profile-pod-retries-negative", compile_with(profile_edit("retries: 2}", "retries: -1}")),
     ["pods.default.retries", ">= 0"]),
    ("profile-pod-memory-not-quantity", compile_with(profile_edit("memory_limit: 8Gi", "memory_limit: 8 GB")),
     ["pods.default.memory_limit", "'8 GB'", "Kubernetes quantity"]),
    ("profile-pod-stage-unknown", compile_with(profile_edit("  prepare-data: {", "  prepare: {")),
     ["pods.prepare", "no such stage"]),
    ("profile-pod-setting-unknown", compile_with(profile_edit("shm_size: 16Gi}", "shm: 16Gi}")),
     ["pods.instruction-tune", "unknown setting(s) shm"]),
    ("profile-checkpoints-relative", compile_with(profile_edit("mount_path: /checkpoints", "mount_path: checkpoints")),
     ["checkpoints.mount_path", "absolute"]),
    ("profile-checkpoints-every-0", compile_with(profile_edit("every: 500", "every: 0")), ["checkpoints.every", ">= 1"]),
    ("profile-caching-off-key", compile_with(profile_edit("  default: true\n  disabled_for:", "  off: true\n  disabled_for:")),
     ["caching", "`default` and `disabled_for`"]),
    ("profile-caching-default-string", compile_with(profile_edit("  default: true\n  disabled_for:",
                                                                 "  default: sometimes\n  disabled_for:")),
     ["caching.default", "true or false"]),
    ("profile-pull-secrets-string", compile_with(profile_edit("image_pull_secrets: [e4srec-registry]",
                                                              "image_pull_secrets: e4srec-registry")),
     ["image_pull_secrets", "a list of names"]),
    ("profile-missing", compile_with(lambda w: w.tmp / "none.yaml"), ["none.yaml", "not found"]),
    # model config.json, run record, training log: typed readers
    ("eval-config-no-model", evaluate(lambda w: edited_json(w, w.sasrec, "config.json", lambda m: m.pop("model"))),
     ["config.json", "missing field 'model'"]),
    ("eval-config-a-list", evaluate(lambda w: with_file(w, w.sasrec, "config.json", "[1, 2]")),
     ["config.json", "expected a JSON object", "list"]),
    ("eval-config-other-stage", evaluate(lambda w: edited_json(w, w.sasrec, "config.json",
                                                               lambda m: m.update(stage="prepare-data"))),
     ["config.json", "'prepare-data'", "pretrain-sasrec"]),
    ("recommend-e4srec-config-backbone-string", recommend("--history", "1", model=lambda w: edited_json(
        w, w.e4srec, "config.json", lambda m: m.update(backbone="smollm2"))),
     ["config.json", "field 'backbone'", "expected dict"]),
    ("batch-e4srec-config-hash-number", batch(model=lambda w: edited_json(w, w.e4srec, "config.json",
                                                                          lambda m: m.update(item_map_sha256=7))),
     ["config.json", "field 'item_map_sha256'"]),
    ("report-training-log-damaged", report(e4srec=lambda w: with_file(w, w.e4srec, "training_log.json", '{"a": 1}')),
     ["training_log.json", "JSON list"]),
    ("rerun-run-record-damaged", rerun_cmd("pretrain-sasrec", record='{"run_id": "x", "parameters": [1]}'),
     ["pipeline_run.json", "field 'parameters'"]),
    # rerun: --set values checked before anything runs
    ("rerun-set-epochs-0", rerun_cmd("pretrain-sasrec", "--set", "epochs=0"), ["epochs=0", ">= 1"]),
    ("rerun-set-dropout-2", rerun_cmd("pretrain-sasrec", "--set", "dropout=2"), ["dropout=2.0"]),
    ("rerun-set-lr-nan", rerun_cmd("train-e4srec", "--set", "lr=nan"), ["lr=nan"]),
    ("rerun-set-loss-unknown", rerun_cmd("pretrain-sasrec", "--set", "loss=hinge"), ["loss", "hinge"]),
    ("rerun-set-backbone-unknown", rerun_cmd("instruction-tune", "--set", "backbone_spec=nope-1b"), ["nope-1b"]),
    ("rerun-set-metric-bogus", rerun_cmd("deploy", "--set", "metric=test/full/HR@0"), ["metric"]),
    ("rerun-set-k-0", rerun_cmd("batch-recommend", "--set", "k=0"), ["k=0"]),
    ("rerun-set-not-a-number", rerun_cmd("pretrain-sasrec", "--set", "epochs=many"), ["epochs=many", "int"]),
    ("rerun-set-unknown-key", rerun_cmd("pretrain-sasrec", "--set", "epoch=3"), ["epoch=3", "KEY one of"]),
    # the whole pipeline: options checked before anything runs
    ("run-input-missing", run_cmd(raw=lambda w: w.tmp / "none.txt"), ["none.txt"]),
    ("run-sasrec-epochs-0", run_cmd("--sasrec-epochs", "0"), ["epochs=0"]),
    ("run-e4srec-lr-inf", run_cmd("--e4srec-lr", "inf"), ["lr=inf"]),
    ("run-dropout-2", run_cmd("--sasrec-dropout", "2"), ["dropout=2.0"]),
    ("run-backbone-unknown", lambda w: (["run", "--input", w.raw, "--pipeline-root", w.tmp / "runs", "--backbone",
                                         "nope-1b", N], w.tmp / "runs", [w.raw]), ["nope-1b"]),
    ("run-gate-metric-bogus", run_cmd("--gate-metric", "test/full/HR@0"), ["metric"]),
]


def shuffled_item_map(w: Work, folder: Path | None = None) -> Path:
    d = w.copy(folder or w.data, "shuffled")
    table = pq.read_table(d / c.ITEM_MAP)
    ids = table.column("item_id").to_pylist()
    ids[0], ids[1] = ids[1], ids[0]
    pq.write_table(table.set_column(1, "item_id", pa.array(ids, pa.string())), d / c.ITEM_MAP)
    return d


def tampered_items(w: Work, bad: int) -> Path:
    d = w.copy(w.data, "tampered")
    table = pq.read_table(d / c.SEQUENCES)
    items = table.column("items").to_pylist()
    items[7] = items[7][:-1] + [bad]
    pq.write_table(table.set_column(2, "items", pa.array(items, pa.list_(pa.int32()))), d / c.SEQUENCES)
    return d


def every_item_data(w: Work) -> Path:
    """Five items; user row 0's training part rewritten to hold all of them (prepare-data itself refuses
    such a user, since no negative is left to sample: this is a tampered or foreign folder)."""
    from e4srec.stages import prepare_data

    raw = w.text("every.txt", "".join(f"{u} {1 + u % 5} {1 + (u + 1) % 5} {1 + (u + 2) % 5}\n" for u in range(1, 9)))
    out = w.tmp / "every"
    prepare_data.run(prepare_data.PrepareDataConfig(n_negatives=2), raw, out)
    table = pq.read_table(out / c.SEQUENCES)
    items = table.column("items").to_pylist()
    items[0] = [1, 2, 3, 4, 5, 1, 2]
    pq.write_table(table.set_column(2, "items", pa.array(items, pa.list_(pa.int32()))), out / c.SEQUENCES)
    return out


def backbone_folder(w: Work, raw: str | None = None, **fields: object) -> Path:
    """An instruction-tune output (tiny backbone, passed through) with its backbone.json changed."""
    folder = w.tmp / "backbone"
    folder.mkdir()
    descriptor = {"stage": "instruction-tune", "backbone": "tiny", "dtype": "auto", "quantization": "none",
                  "local_files_only": True, "fingerprint": None, "skipped": True, "adapter": None, "merged": None}
    for key, value in fields.items():
        if value is None:
            descriptor.pop(key)
        else:
            descriptor[key] = value
    (folder / "backbone.json").write_text(raw if raw is not None else json.dumps(descriptor))
    return folder


def damaged_tiny_cache(w: Work) -> str:
    """A backbone cache (E4SREC_CACHE, restored after the case) whose tiny model's weights are cut short."""
    from e4srec.backbones import resolve

    os.environ["E4SREC_CACHE"] = str(w.tmp / "cache")
    weights = Path(resolve("tiny")) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return "tiny"


def first_item(w: Work) -> str:
    return str(pq.read_table(w.e4srec / c.ITEM_MAP).column("item_id")[0])


def run_cli(argv: list) -> tuple[int, str]:
    from e4srec.cli import main

    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def test_the_table_covers_every_class() -> None:
    assert len(CASES) >= 150, len(CASES)
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(("case_id", "build", "needles"), CASES, ids=[case[0] for case in CASES])
def test_bad_input(case_id: str, build: Callable, needles: list[str], work: Work, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("E4SREC_PIPELINE_RUN_ID", raising=False)
    monkeypatch.setenv("E4SREC_CACHE", os.environ.get("E4SREC_CACHE", str(Path.home() / ".cache" / "e4srec")))
    work.tmp = tmp_path
    argv, output, inputs = build(work)
    watched = [*inputs, work.data, work.sasrec, work.e4srec, work.raw]
    before = digest(watched)
    siblings_before = set(tmp_path.iterdir())
    code, err = run_cli(argv)
    lines = err.strip().splitlines()
    assert code == 1, f"exit {code}: {err[-2000:]}"
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"e4srec {argv[0]}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert digest(watched) == before, "an input changed"
    if output is not None:
        assert not output.exists(), f"{output} was left behind"
    leftovers = [p.name for p in set(tmp_path.iterdir()) - siblings_before]
    assert not [n for n in leftovers if ".partial-" in n or ".old-" in n or n.endswith(".checkpoints")], leftovers
