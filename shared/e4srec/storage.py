"""Local paths and `s3://` URIs, handled the same way for every stage input and output.

S3 settings come from the environment or a profile, as boto3 reads them: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_DEFAULT_REGION, and the endpoint of an S3-compatible server
(SeaweedFS, MinIO, Ceph) in AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL. Requests retry with backoff;
files above 8 MiB go up in parts.

A stage's output folder on S3 is written as objects under `prefix/` and then a marker object,
`prefix/_E4SREC_COMPLETE.json`, listing them. Readers of a folder require the marker, so a reader
never sees a half-written output; a failed upload deletes what it wrote.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from e4srec.errors import E4SRecError

MARKER = "_E4SREC_COMPLETE.json"
MAX_ATTEMPTS = int(os.environ.get("E4SREC_S3_MAX_ATTEMPTS", "5"))
_TEMP_DIRS: list[str] = []


def is_s3(uri: str | Path) -> bool:
    """Whether `uri` names an S3 object or prefix."""
    return str(uri).startswith("s3://")


def split(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    bucket, _, key = str(uri)[len("s3://") :].partition("/")
    if not bucket:
        raise E4SRecError(f"{uri}: no bucket in the URI; write s3://BUCKET/PATH")
    return bucket, key.strip("/")


@lru_cache(maxsize=1)
def client() -> Any:
    """A boto3 S3 client with retries and the endpoint from the environment."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                    s3={"addressing_style": "path"})
    return boto3.session.Session().client("s3", config=config, region_name=os.environ.get("AWS_DEFAULT_REGION",
                                                                                           "us-east-1"))


def _transfer() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=8 * 2**20, multipart_chunksize=8 * 2**20)


def explain(error: Exception, uri: str) -> E4SRecError:
    """One line for an S3 failure: what, where, and what to check."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    if isinstance(error, NoCredentialsError):
        return E4SRecError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(error, EndpointConnectionError) or type(error).__name__ in ("ConnectTimeoutError", "ReadTimeoutError"):
        return E4SRecError(f"{uri}: cannot reach the S3 endpoint {endpoint} after {MAX_ATTEMPTS} attempts; is the "
                           f"server up (AWS_ENDPOINT_URL)?")
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return E4SRecError(f"{uri}: access denied by {endpoint} ({code}); check AWS_ACCESS_KEY_ID, "
                               f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        if code == "NoSuchBucket":
            return E4SRecError(f"{uri}: bucket {split(uri)[0]!r} does not exist at {endpoint}; create it or fix the URI")
        if code in ("NoSuchKey", "404"):
            return E4SRecError(f"{uri}: not found")
        return E4SRecError(f"{uri}: S3 error {code}: {error.response.get('Error', {}).get('Message', '')}")
    return E4SRecError(f"{uri}: S3 request failed ({type(error).__name__}: {str(error)[:200]})")


def _keys(bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _scratch() -> Path:
    path = tempfile.mkdtemp(prefix="e4srec-s3-")
    if not _TEMP_DIRS:
        atexit.register(lambda: [shutil.rmtree(p, ignore_errors=True) for p in _TEMP_DIRS])
    _TEMP_DIRS.append(path)
    return Path(path)


def fetch(uri: str | Path | None) -> Any:
    """A local path for `uri`: itself when local; for S3, a downloaded copy (an object or a complete folder)."""
    if uri is None or not is_s3(uri):
        return uri
    from botocore.exceptions import BotoCoreError, ClientError

    uri = str(uri)
    bucket, key = split(uri)
    try:
        folder = _keys(bucket, key + "/") if key else _keys(bucket, "")
        root = _scratch()
        if not folder:  # a single object
            target = root / (Path(key).name or "object")
            client().download_file(bucket, key, str(target), Config=_transfer())
            return target
        base = key + "/" if key else ""
        if base + MARKER not in folder:
            raise E4SRecError(f"{uri}: folder has no {MARKER}: its writer failed or is still writing; rerun the stage "
                              f"that produces it")
        for k in folder:
            target = root / k[len(base) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            client().download_file(bucket, k, str(target), Config=_transfer())
        (root / MARKER).unlink()
        return root
    except (ClientError, BotoCoreError) as e:
        if isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
            raise E4SRecError(f"{uri}: not found") from None
        raise explain(e, uri) from None


def check_writable(uri: str, overwrite: bool = False) -> list[str]:
    """The keys already under `uri/` (an error when there are some and not `overwrite`), which also
    proves the credentials and the bucket before any work is done."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    if not key:
        raise E4SRecError(f"{uri}: an output needs a prefix inside the bucket, e.g. s3://{bucket}/runs/x")
    try:
        existing = _keys(bucket, key + "/")
    except (ClientError, BotoCoreError) as e:
        raise explain(e, uri) from None
    if existing and not overwrite:
        raise E4SRecError(f"{uri}: output prefix is not empty; choose another --output or pass --overwrite")
    return existing


@contextmanager
def staged_s3_output(uri: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a local folder; on success upload it under `uri/`, the completion marker last."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    existing = check_writable(uri, overwrite)
    local = Path(tempfile.mkdtemp(prefix="e4srec-out-"))
    try:
        yield local
        written: list[str] = []
        try:
            if existing:  # readers see the old output as incomplete from here on
                client().delete_object(Bucket=bucket, Key=f"{key}/{MARKER}")
            for path in sorted(p for p in local.rglob("*") if p.is_file()):
                rel = path.relative_to(local).as_posix()
                client().upload_file(str(path), bucket, f"{key}/{rel}", Config=_transfer())
                written.append(f"{key}/{rel}")
            for stale in set(existing) - set(written) - {f"{key}/{MARKER}"}:
                client().delete_object(Bucket=bucket, Key=stale)
            body = json.dumps({"objects": [w[len(key) + 1 :] for w in written]}).encode()
            client().put_object(Bucket=bucket, Key=f"{key}/{MARKER}", Body=body)
        except (ClientError, BotoCoreError) as e:
            for k in written:  # best effort: leave nothing half-written behind
                try:
                    client().delete_object(Bucket=bucket, Key=k)
                except (ClientError, BotoCoreError):
                    pass
            raise explain(e, uri) from None
    finally:
        shutil.rmtree(local, ignore_errors=True)
