"""Object storage: stages read and write s3:// URIs on a real S3 server (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from e4srec import contracts as c
from e4srec import storage
from e4srec.errors import E4SRecError
from e4srec.outputs import staged_output
from helpers import e4srec
from s3server import BUCKET


def keys(prefix: str) -> list[str]:
    return [k for k in storage._keys(BUCKET, prefix)]


def test_stages_read_and_write_s3(s3, beauty_slice: Path, tmp_path: Path) -> None:  # noqa: ANN001
    storage.client().upload_file(str(beauty_slice), BUCKET, "raw/beauty_800.txt")
    data, model = f"s3://{BUCKET}/runs/a/data", f"s3://{BUCKET}/runs/a/sasrec"
    result = e4srec("prepare-data", "--input", f"s3://{BUCKET}/raw/beauty_800.txt", "--output", data, "--no-tracking")
    assert result.returncode == 0, result.stderr
    assert f"runs/a/data/{storage.MARKER}" in keys("runs/a/data/")
    result = e4srec("pretrain-sasrec", "--data", data, "--output", model, "--epochs", "1", "--no-tracking")
    assert result.returncode == 0, result.stderr
    local = storage.fetch(model)
    assert (local / "item_embeddings.safetensors").is_file() and not (local / storage.MARKER).exists()
    assert c.load_sequence_data(storage.fetch(data)).n_users == 800
    again = e4srec("prepare-data", "--input", f"s3://{BUCKET}/raw/beauty_800.txt", "--output", data, "--no-tracking")
    assert again.returncode == 1 and "output prefix is not empty" in again.stderr


def test_large_files_go_up_in_parts_and_come_back_equal(s3, tmp_path: Path) -> None:  # noqa: ANN001
    blob = os.urandom(20 * 2**20)  # 20 MiB: three 8 MiB parts
    with staged_output(f"s3://{BUCKET}/runs/big", overwrite=False) as out:
        (out / "blob.bin").write_bytes(blob)
        (out / "sub").mkdir()
        (out / "sub" / "small.json").write_text("{}")
    head = storage.client().head_object(Bucket=BUCKET, Key="runs/big/blob.bin")
    assert "-" in head["ETag"]  # a multipart ETag: "<md5 of parts>-<parts>"
    back = storage.fetch(f"s3://{BUCKET}/runs/big")
    assert hashlib.sha256((back / "blob.bin").read_bytes()).digest() == hashlib.sha256(blob).digest()
    assert (back / "sub" / "small.json").read_text() == "{}"


def test_wrong_credentials_and_missing_bucket(s3, beauty_slice: Path) -> None:  # noqa: ANN001
    bad = e4srec("prepare-data", "--input", beauty_slice, "--output", f"s3://{BUCKET}/runs/denied",
                 "--no-tracking", env={"AWS_SECRET_ACCESS_KEY": "wrong", "E4SREC_S3_MAX_ATTEMPTS": "1"})
    assert bad.returncode == 1 and "access denied" in bad.stderr and "AWS_SECRET_ACCESS_KEY" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    missing = e4srec("prepare-data", "--input", beauty_slice, "--output", "s3://no-such-bucket/x", "--no-tracking")
    assert missing.returncode == 1 and "bucket 'no-such-bucket' does not exist" in missing.stderr
    assert not keys("runs/denied/")
    absent = e4srec("pretrain-sasrec", "--data", f"s3://{BUCKET}/nothing/here", "--output", "never-written",
                    "--no-tracking")
    assert absent.returncode == 1 and "s3://e4srec/nothing/here: not found" in absent.stderr


def test_server_stopped_mid_upload_leaves_no_readable_output(s3, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(storage, "MAX_ATTEMPTS", 2)
    storage.client.cache_clear()
    client = storage.client()
    real_upload = client.upload_file
    calls = []

    def upload_then_stop(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        real_upload(*args, **kwargs)
        calls.append(args[2])
        if len(calls) == 1:
            s3.stop()  # the server goes away after the first object of the output

    monkeypatch.setattr(client, "upload_file", upload_then_stop)
    try:
        with pytest.raises(E4SRecError, match="cannot reach the S3 endpoint .* after 2 attempts"):
            with staged_output(f"s3://{BUCKET}/runs/cut", overwrite=False) as out:
                for name in ("a.json", "b.json", "c.json"):
                    (out / name).write_text(name)
    finally:
        s3.start()
        storage.client.cache_clear()
    assert f"runs/cut/{storage.MARKER}" not in keys("runs/cut/")
    with pytest.raises(E4SRecError, match="has no _E4SREC_COMPLETE.json"):
        storage.fetch(f"s3://{BUCKET}/runs/cut")
