"""The MLflow model registry side: log an E4SRec pyfunc, register it, move aliases with a history.

Aliases: `challenger` is the newest registered version; `champion` is what serving reads
(`models:/NAME@champion`). Every alias move writes a model-version tag `e4srec.alias_move.<ms>` on
the version it points to, holding who, when, from which version, why and the metrics, so
`alias_history(NAME)` can read every move back. Alias versions come back as int from SQLite and as
str over REST: they are compared as strings.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from e4srec import contracts as c
from e4srec.errors import E4SRecError

CHAMPION = "champion"
CHALLENGER = "challenger"
MOVE_TAG = "e4srec.alias_move."
PYFUNC_CODE = Path(__file__).parent / "serving" / "pyfunc_model.py"


def client() -> Any:
    """An MlflowClient on MLFLOW_TRACKING_URI (registry included)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def serve_command(name: str, alias: str = CHAMPION, port: int = 5001) -> str:
    """The `mlflow models serve` line that serves `models:/NAME@alias` from this environment."""
    return f"mlflow models serve -m models:/{name}@{alias} --env-manager local -h 127.0.0.1 -p {port}"


def default_name(data_manifest: dict[str, Any]) -> str:
    """`e4srec-<dataset>`: one registered model per dataset (the input file's stem)."""
    stem = str(data_manifest.get("input", {}).get("name", "data")).rsplit(".", 1)[0]
    return "e4srec-" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in stem)


def _requirements() -> list[str]:
    out = []
    for package in ("torch", "transformers", "peft", "safetensors", "pyarrow", "pandas", "numpy", "gguf", "e4srec"):
        try:
            out.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pass
    return out


def signature() -> Any:
    """Request: history (list of item ids), k; response: items, scores, unknown_items."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(Array(DataType.string), "history"), ColSpec(DataType.long, "k", required=False)]),
        outputs=Schema([ColSpec(Array(DataType.string), "items"), ColSpec(Array(DataType.double), "scores"),
                        ColSpec(Array(DataType.string), "unknown_items")]),
    )


def log_and_register(model_dir: Path, name: str, example_history: list[str], tags: dict[str, str]) -> str:
    """Log the model folder as a pyfunc (models-from-code) in the active run and register a version."""
    import mlflow
    import pandas as pd

    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(PYFUNC_CODE), artifacts={"e4srec": str(model_dir)},
        signature=signature(), input_example=pd.DataFrame({"history": [example_history], "k": [10]}),
        pip_requirements=_requirements(), registered_model_name=name, tags=tags,
    )
    return str(info.registered_model_version)


def version_for(name: str, alias: str) -> Any | None:
    """The ModelVersion an alias points to, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def move_alias(name: str, alias: str, to_version: str, reason: str, metrics: dict[str, float] | None = None) -> dict:
    """Point `alias` at `to_version` and record the move on that version."""
    mc = client()
    previous = version_for(name, alias)
    mc.set_registered_model_alias(name, alias, str(to_version))
    move = {"alias": alias, "to": str(to_version), "from": str(previous.version) if previous else None,
            "who": os.environ.get("E4SREC_ACTOR") or getpass.getuser(), "when": time.time(), "reason": reason,
            "metrics": metrics or {}}
    mc.set_model_version_tag(name, str(to_version), f"{MOVE_TAG}{int(move['when'] * 1000)}", json.dumps(move))
    return move


def alias_history(name: str, alias: str | None = None) -> list[dict]:
    """Every recorded alias move of a registered model, oldest first."""
    moves = []
    for mv in client().search_model_versions(f"name = '{name}'"):
        moves += [json.loads(v) for k, v in (mv.tags or {}).items() if k.startswith(MOVE_TAG)]
    return sorted((m for m in moves if alias is None or m["alias"] == alias), key=lambda m: m["when"])


def item_map_of(name: str, version_: str) -> str:
    """The item-map hash a registered version was tagged with."""
    return client().get_model_version(name, str(version_)).tags.get("item_map_sha256", "")


def promote(name: str, *, to_version: str | None = None, rollback: bool = False, force: bool = False) -> dict:
    """Move `champion`: to a version, to the current challenger (default), or back (`rollback`)."""
    mc = client()
    try:
        mc.get_registered_model(name)
    except Exception:  # noqa: BLE001 (MlflowException: not found)
        raise E4SRecError(f"registered model {name!r} not found at {os.environ.get('MLFLOW_TRACKING_URI', 'sqlite:///mlflow.db')}") from None
    current = version_for(name, CHAMPION)
    if rollback:
        if current is None:
            raise E4SRecError(f"{name}: no champion to roll back")
        earlier = [m for m in alias_history(name, CHAMPION) if m["to"] != str(current.version)]
        if not earlier:
            raise E4SRecError(f"{name}: version {current.version} is the only champion there has been; nothing to roll back to")
        target, reason = earlier[-1]["to"], f"rollback from version {current.version}"
    elif to_version:
        target, reason = str(to_version), "manual promotion"
    else:
        challenger = version_for(name, CHALLENGER)
        if challenger is None:
            raise E4SRecError(f"{name}: no challenger; name a version with --version")
        target, reason = str(challenger.version), "manual promotion of the challenger"
    try:
        mc.get_model_version(name, target)
    except Exception:  # noqa: BLE001
        raise E4SRecError(f"{name}: version {target} does not exist") from None
    if current is not None and str(current.version) == target:
        raise E4SRecError(f"{name}: version {target} is already the champion")
    if current is not None and not force and item_map_of(name, target) != item_map_of(name, str(current.version)):
        raise E4SRecError(f"{name}: version {target} was trained on another item map than champion version "
                          f"{current.version}; clients' item ids may not carry over. Pass --force to promote anyway")
    return move_alias(name, CHAMPION, target, reason)


def describe(move: dict) -> str:
    """One line for a move."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(move["when"]))
    return (f"{move['alias']}: version {move['from'] or '-'} -> {move['to']}  ({move['reason']}; {move['who']}, "
            f"{when})")


def write_history(path: Path, name: str) -> None:
    """The alias history as JSON (for reports)."""
    c.write_json(path, alias_history(name))
