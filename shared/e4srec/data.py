"""Ingest, validate, filter, index and sample: everything prepare-data does, as plain functions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from e4srec.errors import E4SRecError
from e4srec.progress import progress

TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv"}


def detect_format(path: Path) -> str:
    """`interactions` for .parquet/.pq/.csv/.tsv files, `s3rec` for anything else (e.g. Beauty.txt)."""
    return "interactions" if path.suffix.lower() in TABLE_SUFFIXES else "s3rec"


def read_s3rec(path: Path) -> pd.DataFrame:
    """Read the S3-Rec text format: one line per user, `user item item ...`, items chronological.

    Returns a long table (user_id, item_id, order) with string ids, in file order. Blank lines are
    skipped; every other defect is an error naming the line and token.
    """
    users: list[str] = []
    items: list[str] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8-sig", errors="strict") as f:  # a leading byte-order mark is skipped
        try:
            for lineno, line in enumerate(f, start=1):
                tokens = line.split()
                if not tokens:
                    continue
                for col, tok in enumerate(tokens, start=1):
                    what = "user id" if col == 1 else "item id"
                    if not (tok.isascii() and tok.isdigit()):
                        raise E4SRecError(
                            f"{path} line {lineno}, token {col}: {tok!r} is not an integer {what}; the S3-Rec "
                            f"format is 'user item item ...' with integer ids 0-9 (use a CSV/Parquet table for "
                            f"string ids)"
                        )
                    if col > 1 and int(tok) == 0:
                        raise E4SRecError(
                            f"{path} line {lineno}, token {col}: item id 0; the S3-Rec format numbers items from 1 "
                            f"(0 is padding), renumber the items or use a CSV/Parquet table"
                        )
                user = str(int(tokens[0]))
                if user in first_line:
                    raise E4SRecError(
                        f"{path} line {lineno}: user {user} already has a line (line {first_line[user]}); "
                        f"merge its items into one chronological line"
                    )
                if len(tokens) == 1:
                    raise E4SRecError(f"{path} line {lineno}: user {user} has no items; remove the line")
                first_line[user] = lineno
                users.extend([user] * (len(tokens) - 1))
                items.extend(str(int(t)) for t in tokens[1:])
        except UnicodeDecodeError as e:
            raise E4SRecError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); is it a binary file?") from None
    if not users:
        raise E4SRecError(f"{path}: file is empty; expected one 'user item item ...' line per user")
    return pd.DataFrame({"user_id": users, "item_id": items, "order": np.arange(len(users), dtype=np.int64)})


def read_interactions(path: Path, user_col: str, item_col: str, time_col: str) -> pd.DataFrame:
    """Read an interactions table (Parquet, CSV or TSV) into (user_id, item_id, order), ids as strings.

    `order` is the timestamp column; ties keep file order. Timestamps may be numbers or ISO dates.
    """
    kind = TABLE_SUFFIXES[path.suffix.lower()]
    try:
        if kind == "parquet":
            table = pq.read_table(path)
        else:
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            table = pacsv.read_csv(
                path,
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=pacsv.ConvertOptions(
                    column_types={user_col: pa.string(), item_col: pa.string()}, strings_can_be_null=True
                ),
            )
    except FileNotFoundError:
        raise E4SRecError(f"{path}: file not found") from None
    except (pa.ArrowInvalid, OSError) as e:
        msg = str(e).splitlines()[0]
        if "Empty CSV file" in msg or path.stat().st_size == 0:
            raise E4SRecError(f"{path}: file is empty; expected a header row and one row per interaction") from None
        raise E4SRecError(f"{path}: cannot read as {kind} ({msg})") from None
    names = table.column_names
    if kind == "csv" and len(names) == 1:  # a header of one column: the file uses another separator
        expected = "tabs" if path.suffix.lower() == ".tsv" else "commas"
        for sep, sep_name, fix in ((",", "commas", "name it .csv"), ("\t", "tabs", "name it .tsv"),
                                   (";", "semicolons", "re-export it with commas")):
            if sep in names[0] and sep_name != expected:
                raise E4SRecError(f"{path}: the header {names[0]!r} reads as one column: the file is separated by "
                                  f"{sep_name}, a {path.suffix} file by {expected}; {fix}")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise E4SRecError(f"{path}: column {duplicated[0]!r} appears {names.count(duplicated[0])} times in the header; "
                          f"column names must be unique")
    for role, col in (("user", user_col), ("item", item_col), ("timestamp", time_col)):
        if col not in names:
            flag = {"user": "--user-col", "item": "--item-col", "timestamp": "--time-col"}[role]
            raise E4SRecError(
                f"{path}: missing {role} column {col!r} (columns: {', '.join(names)}); "
                f"name the right one with {flag}"
            )
    if table.num_rows == 0:
        raise E4SRecError(f"{path}: file has a header but no rows")
    df = table.select([user_col, item_col, time_col]).to_pandas()
    def where(row: int) -> str:  # CSV: the 1-based line (after the header); Parquet: the 0-based row
        return f"line {row + 2}" if kind == "csv" else f"row {row}"

    for col in (user_col, item_col, time_col):
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "") if col != time_col else df[col].isna()
        nulls = np.flatnonzero(empty.to_numpy())
        if len(nulls):
            raise E4SRecError(f"{path} {where(int(nulls[0]))}, column {col!r}: empty value; drop or fill the row")
    order = df[time_col]
    if pd.api.types.is_float_dtype(order):
        bad = np.flatnonzero(~np.isfinite(order.to_numpy()))
        if len(bad):
            raise E4SRecError(f"{path} {where(int(bad[0]))}, column {time_col!r}: {order.iloc[bad[0]]} is not a "
                              f"finite timestamp")
    if not (pd.api.types.is_numeric_dtype(order) or pd.api.types.is_datetime64_any_dtype(order)):
        parsed = pd.to_datetime(order, errors="coerce", utc=True)
        bad = np.flatnonzero(parsed.isna().to_numpy())
        if len(bad):
            raise E4SRecError(
                f"{path} {where(int(bad[0]))}, column {time_col!r}: {order.iloc[bad[0]]!r} is neither a number "
                f"nor a date"
            )
        order = parsed
    out = pd.DataFrame(
        {"user_id": df[user_col].astype(str), "item_id": df[item_col].astype(str), "order": order}
    )
    return out.sort_values(["user_id", "order"], kind="stable").reset_index(drop=True)


def k_core(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iteratively drop users and items with fewer than k interactions until none is left (k<=1: no-op)."""
    if k <= 1:
        return df
    while True:
        user_counts = df["user_id"].map(df["user_id"].value_counts())
        item_counts = df["item_id"].map(df["item_id"].value_counts())
        keep = (user_counts >= k) & (item_counts >= k)
        if keep.all():
            return df
        df = df[keep]


def natural_order(ids: np.ndarray) -> np.ndarray:
    """Sorted unique ids: numerically when every id is an integer (so S3-Rec ids keep their index)."""
    uniq = pd.unique(ids)
    if all(s.isdigit() for s in uniq):
        return np.array(sorted(uniq, key=int), dtype=object)
    return np.array(sorted(uniq), dtype=object)


def build_sequences(df: pd.DataFrame) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, int]:
    """Index items 1..N and users 0..U-1; return (user_ids, item sequences, item_ids, dropped users).

    Users with fewer than 3 interactions cannot give a train, a validation and a test item under
    leave-one-out, so they are dropped (and counted).
    """
    counts = df.groupby("user_id", sort=False).size()
    short = counts[counts < 3].index
    if len(short):
        df = df[~df["user_id"].isin(short)]
    if df.empty:
        raise E4SRecError("no user has the 3 interactions leave-one-out needs; lower --k-core or check the input")
    item_ids = natural_order(df["item_id"].to_numpy())
    item_index = pd.Series(np.arange(1, len(item_ids) + 1, dtype=np.int64), index=item_ids)
    user_ids = natural_order(df["user_id"].to_numpy())
    user_index = pd.Series(np.arange(len(user_ids), dtype=np.int64), index=user_ids)
    df = df.assign(u=df["user_id"].map(user_index).to_numpy(), i=df["item_id"].map(item_index).to_numpy())
    df = df.sort_values(["u"], kind="stable")  # keeps chronological order within a user
    bounds = np.searchsorted(df["u"].to_numpy(), np.arange(len(user_ids) + 1))
    values = df["i"].to_numpy()
    sequences = [values[bounds[u] : bounds[u + 1]] for u in range(len(user_ids))]
    return user_ids, sequences, item_ids, len(short)


def seeded_subset(n: int, k: int, seed: int) -> np.ndarray | None:
    """Sorted indices of k of range(n) drawn with the seed; None (all of them) when k is 0 or >= n."""
    if not k or k >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def sample_negatives(sequences: list[np.ndarray], n_items: int, k: int, seed: int) -> np.ndarray:
    """(U, k) items drawn uniformly, without replacement, from the items each user never touched.

    This is the S3-Rec / E4SRec sampled protocol: one fixed set per user, shared by the validation
    and the test ranking (neither target can be among them, since both are in the user's sequence).
    Seeded and independent of anything but (sequences, n_items, k, seed).
    """
    for u, seq in enumerate(sequences):  # checked before any work (and before the progress bar)
        touched = len(np.unique(seq))
        if n_items - touched < k:
            raise E4SRecError(
                f"user row {u}: touched {touched} of {n_items} items, fewer than {k} remain to sample "
                f"negatives from; lower --n-negatives"
            )
    rng = np.random.default_rng(seed)
    out = np.empty((len(sequences), k), dtype=np.int64)
    for u, seq in enumerate(progress(sequences, desc="negatives", unit="user", mininterval=2, leave=False)):
        seen = set(seq.tolist())
        picked: list[int] = []
        while len(picked) < k:
            for c in rng.integers(1, n_items + 1, size=2 * k).tolist():
                if c not in seen:
                    seen.add(c)
                    picked.append(c)
                    if len(picked) == k:
                        break
        out[u] = picked
    return out
