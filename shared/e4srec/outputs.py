"""Publishing a stage's output folder all at once, so a failed stage leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from e4srec.errors import E4SRecError


def preflight(path: Path | str, overwrite: bool = False) -> None:
    """Fail before any work when the output could not be published: a non-empty folder or prefix
    (without `overwrite`), or an S3 location that refuses the credentials or has no bucket."""
    from e4srec import storage

    if storage.is_s3(path):
        storage.check_writable(str(path), overwrite)
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise E4SRecError(f"{path}: exists and is a file; --output must be a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise E4SRecError(f"{path}: output folder is not empty; choose another --output or pass --overwrite")


@contextmanager
def staged_output(path: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden sibling folder to write into; rename it to `path` only when the block succeeds.

    An `s3://` output is written locally and uploaded at the end, its completion marker last
    (see e4srec.storage).

    On any exception the partial folder is deleted and `path` is left as it was. An existing,
    non-empty `path` is an error unless `overwrite` is set (KFP hands stages a path that does not
    exist yet, or an empty folder).
    """
    from e4srec import storage

    if storage.is_s3(path):
        with storage.staged_s3_output(str(path), overwrite) as local:
            yield local
        return
    preflight(path, overwrite)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the published folder is an ordinary one
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        path.rename(old / "x")
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
