"""The MLflow model registry side: log a recommender as a pyfunc, register it, move aliases with a history.

One registered model per dataset holds both kinds (tag `kind`: e4srec or sasrec) behind one pyfunc
interface: "the recommender for this dataset". Aliases: `challenger` is the latest deploy's candidate
(the better of its run's E4SRec and SASRec); `champion` is what serving reads (`models:/NAME@champion`).
Every alias move writes a model-version tag `e4srec.alias_move.<ms>` on the version it points to,
holding who, when, from which version, why, the metrics and whether it was forced, so
`alias_history(NAME)` can read every move back. Alias versions come back as int from SQLite and as
str over REST: they are compared as strings.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from e4srec import contracts as c
from e4srec.errors import E4SRecError

CHAMPION = "champion"
CHALLENGER = "challenger"
# Each alias move is two tags on the version it moved to: `e4srec.alias_move.<ms>`, one readable line
# (what the MLflow UI shows), and `e4srec.alias_move_record.<ms>`, the JSON record the history is read from.
MOVE_TAG = "e4srec.alias_move."
MOVE_RECORD_TAG = "e4srec.alias_move_record."
PYFUNC_CODE = Path(__file__).parent / "serving" / "pyfunc_model.py"


def client() -> Any:
    """An MlflowClient on MLFLOW_TRACKING_URI (registry included)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def serve_command(name: str, alias: str = CHAMPION, port: int = 5001) -> str:
    """The `mlflow models serve` line that serves `models:/NAME@alias` from this environment, with the
    environment it needs in front: the tracking URI the model was registered at (absolute, so that it
    works from any folder) and, when this environment's bin folder is not on PATH, that folder
    (mlflow starts `uvicorn` by name)."""
    import shutil
    import sys

    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    path = "" if shutil.which("uvicorn") else f"PATH={Path(sys.executable).parent}:$PATH "
    return (f"{path}MLFLOW_TRACKING_URI={uri} mlflow models serve -m models:/{name}@{alias} --env-manager local "
            f"-h 127.0.0.1 -p {port}")


def default_name(data_manifest: dict[str, Any]) -> str:
    """`e4srec-<dataset>`: one registered model per dataset (the input file's stem)."""
    stem = str(data_manifest.get("input", {}).get("name", "data")).rsplit(".", 1)[0]
    return "e4srec-" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in stem)


# What the served model imports, by kind; mlflow adds itself. Versions are the installed ones without
# local labels (torch 2.13.0+cpu -> 2.13.0), so a fresh environment installs them from the public index.
REQUIREMENTS = {"sasrec": ("torch", "safetensors", "pyarrow", "pandas", "numpy", "tqdm"),
                "e4srec": ("torch", "safetensors", "pyarrow", "pandas", "numpy", "tqdm", "transformers", "tokenizers",
                           "peft", "accelerate", "gguf")}
# Backbones up to this size travel with the registered model; larger ones are a reference with a hash.
LOG_BACKBONE_MAX_MB = int(os.environ.get("E4SREC_LOG_BACKBONE_MAX_MB", "2048"))


def requirements(kind: str) -> list[str]:
    """`package==version` lines a fresh environment installs from the public index."""
    from packaging.version import Version

    out = []
    for package in REQUIREMENTS[kind]:
        try:
            out.append(f"{package}=={Version(version(package)).public}")
        except PackageNotFoundError:
            pass
    return out


def signature() -> Any:
    """Request: history (list of item ids, strings or integers: the model checks them), k; response: items,
    scores, unknown_items. `history` is typed Any because MLflow's schema check cannot say "strings or
    integers" and would refuse `[1, 2]` with a message about numpy dtypes."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "history"), ColSpec(DataType.long, "k", required=False)]),
        outputs=Schema([ColSpec(Array(DataType.string), "items"), ColSpec(Array(DataType.double), "scores"),
                        ColSpec(Array(DataType.string), "unknown_items")]),
    )


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def _backbone(llm: dict[str, Any], scratch: Path) -> dict[str, str]:
    """Artifacts that make an E4SRec folder servable on a machine without its backbone.

    The backbone's weights (a GGUF file or a model folder) are logged beside the folder when they are at
    most LOG_BACKBONE_MAX_MB, and the served model loads them from there; a larger local backbone is
    recorded by spec and SHA-256 in `backbone_reference.json`, which the served model checks before
    loading; a hub id needs nothing (the serving machine downloads it or has it cached).
    """
    from e4srec import backbones

    source = backbones.weights_source(llm["backbone"], llm.get("local_files_only", True))
    if source is None:
        return {}
    path = source[1]
    if _size_mb(path) <= LOG_BACKBONE_MAX_MB:
        return {"backbone": str(path)}
    reference = scratch / "backbone_reference.json"
    c.write_json(reference, {"backbone": llm["backbone"], "sha256": backbones.weights_sha256(path)})
    return {"backbone_reference": str(reference)}


def logged_files(artifacts: dict[str, str]) -> tuple[Path, str | None]:
    """A logged model's artifacts ({name: local path}) -> (its model folder, the spec that loads its logged
    backbone: gguf:FILE or hf:FOLDER, None when none was logged)."""
    folder = Path(artifacts.get("model") or artifacts["e4srec"])  # "e4srec": versions logged before SASRec was
    path = artifacts.get("backbone")
    return folder, (f"{'hf' if Path(path).is_dir() else 'gguf'}:{path}" if path else None)


def log_and_register(model_dir: Path, name: str, example_history: list[str], tags: dict[str, str]) -> str:
    """Log a model folder (E4SRec or SASRec) as a pyfunc in the active run and register a version of `name`.

    The project's code travels as `code_paths`, the requirements are public releases, and an E4SRec
    carries its backbone (see `_backbone`): the model serves from a fresh environment anywhere.
    """
    import tempfile

    import mlflow
    import pandas as pd

    import e4srec
    from e4srec import trained

    kind, meta = trained.read_config(model_dir)
    with tempfile.TemporaryDirectory() as scratch:
        artifacts = {"model": str(model_dir)} | (_backbone(meta["backbone"], Path(scratch)) if kind == "e4srec" else {})
        info = mlflow.pyfunc.log_model(
            name=f"model-{kind}", python_model=str(PYFUNC_CODE), artifacts=artifacts,
            code_paths=[str(Path(e4srec.__file__).parent)], signature=signature(),
            input_example=pd.DataFrame({"history": [example_history], "k": [10]}), pip_requirements=requirements(kind),
            registered_model_name=name, tags=tags | {"kind": kind},
        )
    return str(info.registered_model_version)


def download(uri: str) -> tuple[Path, str | None]:
    """Fetch a registered model (`models:/NAME@ALIAS` or `models:/NAME/VERSION`): (the logged model
    folder, the backbone spec that loads its logged copy, None for a SASRec or an unlogged backbone)."""
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as e:  # noqa: BLE001 (MlflowException, or the artifact store's own errors)
        raise E4SRecError(f"{uri}: cannot download ({str(e).splitlines()[0][:200]})") from None
    flavor = mlflow.models.Model.load(str(local / "MLmodel")).flavors["python_function"]
    return logged_files({k: str(local / v["path"]) for k, v in flavor.get("artifacts", {}).items()})


def version_for(name: str, alias: str) -> Any | None:
    """The ModelVersion an alias points to, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def move_alias(name: str, alias: str, to_version: str, reason: str, metrics: dict[str, float] | None = None, *,
               forced: bool = False, rollback: bool = False) -> dict:
    """Point `alias` at `to_version` and record the move on that version (`forced`: against or without the
    gate; `rollback`: undoing the move that made the current version champion)."""
    mc = client()
    previous = version_for(name, alias)
    mc.set_registered_model_alias(name, alias, str(to_version))
    move = {"alias": alias, "to": str(to_version), "from": str(previous.version) if previous else None,
            "who": os.environ.get("E4SREC_ACTOR") or getpass.getuser(), "when": time.time(), "reason": reason,
            "metrics": metrics or {}, "forced": forced, "rollback": rollback}
    stamp = int(move["when"] * 1000)
    mc.set_model_version_tag(name, str(to_version), f"{MOVE_RECORD_TAG}{stamp}", json.dumps(move))
    mc.set_model_version_tag(name, str(to_version), f"{MOVE_TAG}{stamp}", describe(move, utc=True))
    return move


def restore_aliases(name: str, aliases: dict[str, str | None]) -> None:
    """Put aliases back where they were ({alias: version or None}); no history is written (nothing moved)."""
    mc = client()
    for alias, version_ in aliases.items():
        if version_ is None:
            try:
                mc.delete_registered_model_alias(name, alias)
            except Exception:  # noqa: BLE001 (already absent)
                pass
        else:
            mc.set_registered_model_alias(name, alias, str(version_))


def alias_history(name: str, alias: str | None = None) -> list[dict]:
    """Every recorded alias move of a registered model, oldest first."""
    moves = []
    for mv in client().search_model_versions(f"name = '{name}'"):
        for key, value in (mv.tags or {}).items():  # JSON under MOVE_TAG: a move recorded by an earlier build
            if key.startswith(MOVE_RECORD_TAG) or key.startswith(MOVE_TAG) and value.startswith("{"):
                moves.append(json.loads(value))
    return sorted((m for m in moves if alias is None or m["alias"] == alias), key=lambda m: m["when"])


def item_map_of(name: str, version_: str) -> str:
    """The item-map hash a registered version was tagged with."""
    return client().get_model_version(name, str(version_)).tags.get("item_map_sha256", "")


def champions(name: str) -> list[str]:
    """The champion versions in the order they were crowned, rollbacks undone: the last is the current
    champion, the one before it is where a rollback goes (1 -> 3 -> 2, rollback, rollback: 3, then 1)."""
    stack: list[str] = []
    for move in alias_history(name, CHAMPION):
        if move.get("rollback") and len(stack) >= 2 and stack[-1] == move["from"] and stack[-2] == move["to"]:
            stack.pop()
        elif not stack or stack[-1] != move["to"]:
            stack.append(move["to"])
    return stack


def check_exists(name: str) -> None:
    """One line when there is no registered model of this name."""
    try:
        client().get_registered_model(name)
    except Exception:  # noqa: BLE001 (MlflowException: not found, or the store's own error)
        raise E4SRecError(f"{name}: no registered model of that name at "
                          f"{os.environ.get('MLFLOW_TRACKING_URI', 'sqlite:///mlflow.db')}; deploy registers it") from None


@contextmanager
def alias_lock(name: str) -> Iterator[None]:
    """Serialise alias moves of one registered model (read the champion, move it, record the move) among
    the processes of this machine, so that two promotions at once leave an alias and a history that
    agree. MLflow has no compare-and-set on aliases: processes on different machines sharing one
    tracking server are not serialised by this."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    key = hashlib.sha256(f"{uri}|{name}".encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"e4srec-aliases-{key}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def promote(name: str, *, to_version: str | None = None, rollback: bool = False, force: bool = False) -> dict:
    """Move `champion`: to a version, to the current challenger (default), or back (`rollback`) along the
    recorded history. A version the gate never chose as its run's candidate needs `force`."""
    with alias_lock(name):
        return _promote(name, to_version, rollback, force)


def _promote(name: str, to_version: str | None, rollback: bool, force: bool) -> dict:
    mc = client()
    check_exists(name)
    current = version_for(name, CHAMPION)
    if rollback:
        if current is None:
            raise E4SRecError(f"{name}: no champion to roll back")
        earlier = [v for v in champions(name)[:-1] if v != str(current.version)]
        if not earlier:
            raise E4SRecError(f"{name}: version {current.version} is the only champion there has been; nothing to roll back to")
        target = earlier[-1]
        return move_alias(name, CHAMPION, target, f"rollback from version {current.version}", forced=force,
                          rollback=True)
    elif to_version:
        target, reason = str(to_version), "manual promotion"
    else:
        challenger = version_for(name, CHALLENGER)
        if challenger is None:
            raise E4SRecError(f"{name}: no challenger; name a version with --version")
        target, reason = str(challenger.version), "manual promotion of the challenger"
    try:
        tags = mc.get_model_version(name, target).tags or {}
    except Exception:  # noqa: BLE001
        raise E4SRecError(f"{name}: version {target} does not exist") from None
    if current is not None and str(current.version) == target:
        raise E4SRecError(f"{name}: version {target} is already the champion")
    if current is not None and not force and item_map_of(name, target) != item_map_of(name, str(current.version)):
        raise E4SRecError(f"{name}: version {target} was trained on another item map than champion version "
                          f"{current.version}; clients' item ids may not carry over. Pass --force to promote anyway")
    if tags.get("gate") != "candidate" and target not in champions(name) and not force:
        raise E4SRecError(f"{name}: version {target} was never chosen by the gate nor champion before (gate: "
                          f"{tags.get('gate', 'none')}); pass --force to promote it anyway, recorded as forced")
    return move_alias(name, CHAMPION, target, reason, forced=force)


def describe(move: dict, *, utc: bool = False) -> str:
    """One line for a move (`utc`: its time in UTC, for a tag read from anywhere; else local time)."""
    when = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(move["when"])) if utc else
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(move["when"])))
    forced = "forced: " if move.get("forced") and not move["reason"].startswith("forced") else ""
    return (f"{move['alias']}: version {move['from'] or '-'} -> {move['to']}  ({forced}{move['reason']}; {move['who']}, "
            f"{when})")
