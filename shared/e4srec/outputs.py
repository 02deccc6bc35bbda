"""Putting a stage's output folder in place all at once, so a failed stage leaves nothing behind.

A stage never writes, moves or deletes a path it did not create: its output may not equal, hold or
sit inside any of its inputs, a non-empty output is replaced only with `overwrite`, and the output's
place is checked for writability before any work.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from e4srec.errors import E4SRecError

Inputs = Mapping[str, "Path | str | None"]


def _same_or_nested(a: str, b: str, sep: str) -> bool:
    a, b = a.rstrip(sep), b.rstrip(sep)
    return a == b or a.startswith(b + sep) or b.startswith(a + sep)


def check_apart(output: Path | str, inputs: Inputs, what: str = "--output") -> None:
    """Refuse an output that equals, contains or lies inside one of the stage's inputs.

    `inputs` maps an option name (e.g. "--data") to its value; values that are not paths on this
    machine or in S3 (a backbone name such as smollm2-135m) are skipped.
    """
    from e4srec import storage

    out = str(output)
    for name, value in inputs.items():
        if value is None or str(value) == "":
            continue
        value = str(value)
        if storage.is_s3(out) and storage.is_s3(value):
            clash = _same_or_nested(out, value, "/")
        elif storage.is_s3(out) or storage.is_s3(value) or not Path(value).exists():
            continue
        else:
            clash = _same_or_nested(str(Path(out).resolve()), str(Path(value).resolve()), os.sep)
        if clash:
            raise E4SRecError(f"{what} {out} overlaps the input {name} {value}: a stage never writes where it reads; "
                              f"choose an {what} outside every input")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def hidden_sibling(path: Path, kind: str) -> Path:
    """A new private folder `.NAME.KIND-PID-XXXX` beside `path`, after deleting those of the same NAME and
    KIND whose process is gone (a stage killed with SIGKILL cannot clean up after itself)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.{kind}-(\d+)-")
    for stale in path.parent.iterdir() if path.parent.is_dir() else []:
        m = pattern.match(stale.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(stale, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.{kind}-{os.getpid()}-", dir=path.parent))


def check_writable_place(path: Path, flag: str = "--output") -> None:
    """Fail now, not after the work, when `path` could not be created: a file in the way or a
    read-only parent."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise E4SRecError(f"{path}: cannot be created, {parent} is a file; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise E4SRecError(f"{path}: cannot be created, {parent} is not writable; choose another {flag}")
    if parent == path.parent:
        try:  # os.access says yes for root on a read-only file system: a real probe settles it
            probe = Path(tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=parent))
        except OSError as e:
            raise E4SRecError(f"{path}: cannot be created in {parent} ({e.strerror}); choose another {flag}") from None
        probe.rmdir()


def preflight(path: Path | str, overwrite: bool = False, inputs: Inputs | None = None) -> None:
    """Fail before any work when the output could not be put in place: it overlaps an input, is a
    non-empty folder or prefix (without `overwrite`), cannot be created here, or is an S3 location
    that refuses the credentials or has no bucket."""
    from e4srec import storage

    check_apart(path, inputs or {})
    if storage.is_s3(path):
        storage.check_writable(str(path), overwrite)
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise E4SRecError(f"{path}: exists and is a file; --output must be a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise E4SRecError(f"{path}: output folder is not empty; choose another --output or pass --overwrite")
    check_writable_place(path)


@contextmanager
def staged_output(path: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden sibling folder to write into; rename it to `path` only when the block succeeds.

    An `s3://` output is written locally and uploaded at the end, its completion marker last
    (see e4srec.storage).

    On any exception (SIGTERM included: the CLI turns it into one) the partial folder is deleted and
    `path` is left as it was. An existing, non-empty `path` is an error unless `overwrite` is set
    (KFP hands stages a path that does not exist yet, or an empty folder). The overlap with the
    stage's inputs is `preflight`'s check, which every stage runs before its work.
    """
    from e4srec import storage

    if storage.is_s3(path):
        with storage.staged_s3_output(str(path), overwrite) as local:
            yield local
        return
    preflight(path, overwrite)
    path = Path(path)
    tmp = hidden_sibling(path, "partial")
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the folder put in place is an ordinary one
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = hidden_sibling(path, "old")
        path.rename(old / "x")
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
