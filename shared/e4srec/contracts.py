"""Artifact contracts: the files each stage writes and the checks every reader runs.

prepare-data output (a folder):
  sequences.parquet  user (int32, 0..U-1), user_id (string, original id), items (list<int32>:
                     item indices 1..N in chronological order, the whole history, uncut)
  item_map.parquet   item (int32, 1..N), item_id (string, original id). Index 0 is padding and has
                     no row: every model reserves row 0 of its item tables for it.
  negatives.parquet  user (int32), negatives (list<int32>, 99 items the user never touched, seeded)
  manifest.json      counts, seed, max_len, input checksum and the item-map hash
  metrics.json       flat dataset statistics

Leave-one-out split (read from sequences.parquet, never stored twice):
  train = items[:-2], valid target = items[-2], test target = items[-1]; every history a model sees
  is cut to its last `max_len` items.

Every later artifact records the item-map hash; a reader that sees another hash stops.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from e4srec.errors import E4SRecError

FORMAT_VERSION = 1
SEQUENCES = "sequences.parquet"
ITEM_MAP = "item_map.parquet"
NEGATIVES = "negatives.parquet"
MANIFEST = "manifest.json"
METRICS = "metrics.json"
SPLITS = ("valid", "test")
# metrics.json keys: <split>/<protocol>/<metric>, e.g. test/full/NDCG@10
KS_HR = (1, 5, 10, 20)
KS_NDCG = (5, 10, 20)
METRIC_NAMES = tuple(f"HR@{k}" for k in KS_HR) + tuple(f"NDCG@{k}" for k in KS_NDCG) + ("MRR",)
PROTOCOLS = ("full", "sampled")


def item_map_hash(item_ids: Sequence[str]) -> str:
    """SHA-256 of the item ids in index order (1..N): two artifacts agree on items iff this agrees."""
    return hashlib.sha256(json.dumps(list(item_ids), separators=(",", ":")).encode()).hexdigest()


def check_item_map_hash(found: str | None, expected: str, what: str, fix: str) -> None:
    """Stop with one line when an artifact was built against another item map than the data's."""
    if found != expected:
        raise E4SRecError(
            f"{what}: item-map hash {str(found)[:12]} differs from the data's {expected[:12]}; "
            f"it was built from another prepare-data output ({fix})"
        )


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path | str, obj: Any) -> None:
    """Indented, key-sorted JSON with a trailing newline (stable bytes for stable checksums)."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


MANIFEST_FIELDS = {"format_version": int, "n_users": int, "n_items": int, "max_len": int, "n_negatives": int,
                   "item_map_sha256": str}


# config.json of a model folder, by the stage that wrote it (pretrain-sasrec, train-e4srec).
MODEL_CONFIG_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "pretrain-sasrec": {"stage": str, "model": dict, "train": dict, "item_map_sha256": str},
    "train-e4srec": {"stage": str, "model": dict, "train": dict, "backbone": dict, "prompt": dict,
                     "item_map_sha256": str, "instruct_adapter": (str, type(None))},
}
# Fields model folders written by an earlier release hold under another name: {stage: {old: current}}.
RENAMED_FIELDS = {"train-e4srec": {"llm": "backbone"}}
RUN_RECORD_FIELDS = {"run_id": str, "parameters": dict}  # pipeline_run.json, beside a local run's outputs


def read_model_config(path: Path | str, stage: str | tuple[str, ...]) -> dict[str, Any]:
    """A model folder's config.json, written by `stage` (or one of them), with that stage's fields typed.
    A field under an older name (RENAMED_FIELDS) is returned under its current one."""
    stages = (stage,) if isinstance(stage, str) else stage
    fix = f"pass a {' or '.join(stages)} output folder"
    meta = read_json_object(path, {"stage": str}, fix)
    if meta["stage"] not in stages:
        raise E4SRecError(f"{path}: written by {meta['stage']!r}, not {' or '.join(stages)}; {fix}")
    for old, new in RENAMED_FIELDS.get(meta["stage"], {}).items():
        if old in meta and new not in meta:
            meta[new] = meta.pop(old)
    return check_fields(path, meta, MODEL_CONFIG_FIELDS[meta["stage"]], f"re-run {meta['stage']} or {fix}")


def read_json_list(path: Path | str, fix: str) -> list[Any]:
    """A JSON file holding a list of objects (a training log), any defect one line."""
    obj = read_json(path)
    if not isinstance(obj, list) or not all(isinstance(x, dict) for x in obj):
        raise E4SRecError(f"{path}: expected a JSON list of objects, found {type(obj).__name__}; {fix}")
    return obj


def read_json_object(path: Path | str, fields: dict[str, type | tuple[type, ...]], fix: str) -> dict[str, Any]:
    """Read a JSON object whose `fields` must be present with these types; any defect is one line
    naming the file and the field."""
    return check_fields(path, read_json(path), fields, fix)


def check_fields(path: Path | str, obj: Any, fields: dict[str, type | tuple[type, ...]], fix: str) -> dict[str, Any]:
    """`obj` (read from `path`) as a JSON object with `fields` present and of these types, or a one-line error."""
    if not isinstance(obj, dict):
        raise E4SRecError(f"{path}: expected a JSON object, found {type(obj).__name__}; {fix}")
    for key, tp in fields.items():
        if key not in obj:
            raise E4SRecError(f"{path}: missing field {key!r}; {fix}")
        value = obj[key]
        if isinstance(value, bool) and tp is not bool or not isinstance(value, tp):
            names = " or ".join(t.__name__ for t in (tp if isinstance(tp, tuple) else (tp,)))
            raise E4SRecError(f"{path}: field {key!r} is {value!r}, expected {names}; {fix}")
    return obj


def read_safetensors(path: Path | str) -> dict[str, Any]:
    """Read a safetensors file into CPU tensors; a missing, truncated or foreign file is one line."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise E4SRecError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types (and OSError)
        raise E4SRecError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:160]}); "
                          f"the file is truncated or of another format, re-create it") from None


def read_json(path: Path | str) -> Any:
    """Read a JSON file, naming the file in the error when it is missing or malformed."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise E4SRecError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise E4SRecError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _read_table(path: Path, columns: list[str]) -> pa.Table:
    if not path.exists():
        raise E4SRecError(f"{path}: file not found; point --data at a prepare-data output folder")
    try:
        table = pq.read_table(path)
    except pa.ArrowInvalid as e:
        raise E4SRecError(f"{path}: not a readable Parquet file ({e}); re-run prepare-data") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise E4SRecError(
            f"{path}: missing column {', '.join(missing)} (has {', '.join(table.column_names)}); re-run prepare-data"
        )
    return table


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list<int> column, without building one Python list per row."""
    col = table.column(name).combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    return offsets - offsets[0], values[offsets[0] : offsets[-1]]


@dataclass
class SequenceData:
    """A validated prepare-data output: the one in-memory view every stage reads."""

    root: Path
    manifest: dict[str, Any]
    user_ids: np.ndarray  # (U,) str
    offsets: np.ndarray  # (U+1,) int64, CSR offsets into `values`
    values: np.ndarray  # (total interactions,) int64 item indices 1..N
    item_ids: np.ndarray  # (N+1,) str; item_ids[0] = "" is the padding slot
    negatives: np.ndarray  # (U, n_negatives) int64

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def max_len(self) -> int:
        return int(self.manifest["max_len"])

    @property
    def item_map_sha256(self) -> str:
        return str(self.manifest["item_map_sha256"])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, user: int) -> np.ndarray:
        """The whole chronological item-index sequence of one user."""
        return self.values[self.offsets[user] : self.offsets[user + 1]]

    def train_matrix(self) -> np.ndarray:
        """(U, max_len+1) left-padded training sequences items[:-2], cut to their last max_len+1 items.

        One extra column so that inputs = m[:, :-1] and next-item targets = m[:, 1:] are both max_len
        wide, as SASRec trains.
        """
        return self._left_padded(end_offset=-2, width=self.max_len + 1)

    def prefix_examples(self, max_targets: int) -> tuple[np.ndarray, np.ndarray]:
        """(histories (E, max_len) left-padded, targets (E,)): every prefix of items[:-2] and its next item,
        the last `max_targets` targets of each user (E4SRec's training data, as the paper's code builds it)."""
        L = self.max_len
        starts = self.offsets[:-1]
        n_train = self.lengths - 2  # items[:-2]
        first = np.maximum(1, n_train - max_targets)  # first target position per user (>= 1: a history)
        counts = np.maximum(n_train - first, 0)
        user = np.repeat(np.arange(self.n_users), counts)
        k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + first[user]  # target pos
        target_abs = starts[user] + k
        lengths = np.minimum(k, L)
        cols = np.arange(L)[None, :]
        keep = cols >= L - lengths[:, None]  # (E, L): the right-aligned part holds the history
        src = target_abs[:, None] - L + cols  # item index of each column
        histories = np.zeros((len(k), L), dtype=np.int64)
        histories[keep] = self.values[src[keep]]
        return histories, self.values[target_abs]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(histories (U, max_len) left-padded with 0, targets (U,)) for `valid` or `test`."""
        if name not in SPLITS:
            raise E4SRecError(f"split {name!r}: expected one of {', '.join(SPLITS)}")
        drop = 2 if name == "valid" else 1
        targets = self.values[self.offsets[1:] - drop]
        return self._left_padded(end_offset=-drop, width=self.max_len), targets

    def _left_padded(self, end_offset: int, width: int) -> np.ndarray:
        ends = self.offsets[1:] + end_offset  # (U,) exclusive end of each user's kept prefix
        starts = np.maximum(self.offsets[:-1], ends - width)
        lengths = ends - starts
        out = np.zeros((self.n_users, width), dtype=np.int64)
        cols = width - lengths[:, None] + np.arange(width)[None, :]  # (U, width) column of each element
        rows = np.broadcast_to(np.arange(self.n_users)[:, None], cols.shape)
        src = starts[:, None] + np.arange(width)[None, :]
        keep = np.arange(width)[None, :] < lengths[:, None]
        out[rows[keep], cols[keep]] = self.values[src[keep]]
        return out


def load_sequence_data(root: Path | str) -> SequenceData:
    """Read and validate a prepare-data output folder; every error names the file and row."""
    root = Path(root)
    if not root.is_dir():
        raise E4SRecError(f"{root}: not a folder; point --data at a prepare-data output folder")
    manifest = read_json_object(root / MANIFEST, MANIFEST_FIELDS, "re-run prepare-data")
    if manifest["format_version"] != FORMAT_VERSION:
        raise E4SRecError(
            f"{root / MANIFEST}: format_version {manifest.get('format_version')!r}, this e4srec reads "
            f"{FORMAT_VERSION}; re-run prepare-data"
        )

    imap = _read_table(root / ITEM_MAP, ["item", "item_id"])
    index = imap.column("item").to_numpy()
    n_items = len(index)
    if n_items != manifest["n_items"] or not np.array_equal(index, np.arange(1, n_items + 1)):
        raise E4SRecError(
            f"{root / ITEM_MAP}: item column must be 1..{manifest['n_items']} in order; re-run prepare-data"
        )
    item_ids = np.array([""] + imap.column("item_id").to_pylist(), dtype=object)
    check_item_map_hash(
        item_map_hash(item_ids[1:].tolist()), manifest["item_map_sha256"], str(root / ITEM_MAP),
        "the manifest and the item map disagree; re-run prepare-data",
    )

    seqs = _read_table(root / SEQUENCES, ["user", "user_id", "items"])
    users = seqs.column("user").to_numpy()
    if not np.array_equal(users, np.arange(len(users))):
        raise E4SRecError(f"{root / SEQUENCES}: user column must be 0..{len(users) - 1} in order; re-run prepare-data")
    offsets, values = _list_column(seqs, "items")
    user_ids = np.array(seqs.column("user_id").to_pylist(), dtype=object)
    bad = np.flatnonzero((values < 1) | (values > n_items))
    if len(bad):
        row = int(np.searchsorted(offsets, bad[0], side="right") - 1)
        raise E4SRecError(
            f"{root / SEQUENCES} row {row} (user {user_ids[row]!r}): item index {values[bad[0]]} is out of "
            f"range 1..{n_items}; the file does not match {ITEM_MAP}, re-run prepare-data"
        )
    short = np.flatnonzero(np.diff(offsets) < 3)
    if len(short):
        raise E4SRecError(
            f"{root / SEQUENCES} row {short[0]}: {int(np.diff(offsets)[short[0]])} items, leave-one-out needs "
            f"at least 3; re-run prepare-data"
        )

    neg_table = _read_table(root / NEGATIVES, ["user", "negatives"])
    n_offsets, n_values = _list_column(neg_table, "negatives")
    k = int(manifest["n_negatives"])
    if len(neg_table) != len(users) or not np.all(np.diff(n_offsets) == k):
        raise E4SRecError(f"{root / NEGATIVES}: expected {k} negatives for each of {len(users)} users; re-run prepare-data")
    negatives = n_values.reshape(len(users), k)
    if negatives.size and (negatives.min() < 1 or negatives.max() > n_items):
        raise E4SRecError(f"{root / NEGATIVES}: negative item index out of range 1..{n_items}; re-run prepare-data")
    return SequenceData(root, manifest, user_ids, offsets, values, item_ids, negatives)
