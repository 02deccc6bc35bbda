"""Stage deploy: score the run's E4SRec and SASRec and the champion, decide, then register and judge.

Three models are scored by the one evaluator on the same seeded users of the same split: the run's
E4SRec, the run's SASRec, and the registered champion (of either kind). The run's candidate is the
better of its two (E4SRec must beat its own SASRec; a tie goes to SASRec, the cheaper model). With
no champion the candidate becomes champion (unless `when_no_champion=hold`); otherwise it must beat
the champion by more than `min_margin`. A champion trained on another item map cannot be scored on
this data: the verdict is then "hold". `force_promote` makes the run's E4SRec champion whatever the
scores, recorded as forced.

All or nothing: the verdict is computed before anything is registered; then both models are
registered under one name (tag `kind`), `challenger` points at the candidate, and (with `apply`)
`champion` moves. A failure during that leaves the registry as it was: the new versions are deleted
and the aliases put back. Moving `champion` is otherwise a separate step the pipeline runs under
`dsl.If` on the verdict (`promote-champion`); the CLI applies it at once unless `--no-apply`.

Output folder: verdict.json (the three scores, versions, decision, reason), metrics.json.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from e4srec import config as cfg
from e4srec import contracts as c
from e4srec import registry, trained
from e4srec.data import seeded_subset
from e4srec.device import resolve_device
from e4srec.errors import E4SRecError
from e4srec.evaluate import evaluate
from e4srec.outputs import preflight, staged_output
from e4srec.settings import DeployConfig
from e4srec.storage import fetch
from e4srec.tracking import Tracker, mlflow_key, tracked

STAGE = "deploy"
VERDICT = "verdict.json"
LABELS = trained.LABELS  # E4SRec, SASRec: how verdicts name the kinds


def _score(folder: Path, data: c.SequenceData, config: DeployConfig, users: np.ndarray | None,
           backbone: str | None = None) -> float:
    """The gate metric of a model folder on `users` of the metric's split."""
    device = resolve_device(config.device)
    model = trained.load(folder, device, backbone=backbone)
    split = config.metric.split("/")[0]
    return evaluate(model.score, data, split, batch_size=config.eval_batch_size, device=device, users=users,
                    progress=True).metrics()[config.metric]


def decide(config: DeployConfig, scores: dict[str, float], champion: dict[str, Any] | None) -> dict[str, Any]:
    """The verdict from the run's two scores and the champion ({version, kind, value or None}), no side effects.

    Returns {candidate, promote, forced, reason}; the reason names every score it compared.
    """
    candidate = "e4srec" if scores["e4srec"] > scores["sasrec"] else "sasrec"
    better = ("E4SRec beats its SASRec" if candidate == "e4srec" else
              "E4SRec does not beat its SASRec, so SASRec is the run's candidate")
    said = f"{config.metric}: E4SRec {scores['e4srec']:.5f}, SASRec {scores['sasrec']:.5f}"
    if champion is None:
        promote = config.when_no_champion == "promote"
        reason = f"{said}, no champion yet; {better}" + ("" if promote else " (when_no_champion=hold)")
    elif champion["value"] is None:
        promote = False
        reason = (f"{said}; champion version {champion['version']} has another item map: not comparable on this "
                  f"data (force_promote to override)")
    else:
        value = champion["value"]
        promote = scores[candidate] > value + config.min_margin
        margin = f" by more than {config.min_margin}" if config.min_margin else ""
        reason = (f"{said}, champion v{champion['version']} ({LABELS[champion['kind']]}) {value:.5f}; {better}; "
                  f"{LABELS[candidate]} {'beats' if promote else 'does not beat'} the champion{margin}")
    forced = config.force_promote
    if forced:
        candidate, promote = "e4srec", True
        reason = f"forced (force_promote): the run's E4SRec becomes champion whatever the gate says ({reason})"
    return {"candidate": candidate, "promote": promote, "forced": forced, "reason": reason}


def _champion(name: str, data: c.SequenceData, config: DeployConfig, users: np.ndarray | None
              ) -> dict[str, Any] | None:
    """The current champion scored on this data: {version, kind, value}; value None when not comparable."""
    version = registry.version_for(name, registry.CHAMPION)
    if version is None:
        return None
    tags = version.tags or {}
    out = {"version": str(version.version), "kind": tags.get("kind", "e4srec"), "value": None}
    if tags.get("item_map_sha256", "") == data.item_map_sha256:
        folder, backbone = registry.download(f"models:/{name}@{registry.CHAMPION}")
        out["value"] = _score(folder, data, config, users, backbone)
    return out


def _register(name: str, folders: dict[str, Path], data: c.SequenceData, config: DeployConfig,
              scores: dict[str, float], decision: dict[str, Any], apply: bool) -> dict[str, str]:
    """Register both models, point challenger (and with `apply` champion) at the candidate; {kind: version}.

    All or nothing: on any failure the versions made here are deleted and the aliases put back.
    """
    mc = registry.client()
    existed = True
    try:
        mc.get_registered_model(name)
    except Exception:  # noqa: BLE001 (MlflowException RESOURCE_DOES_NOT_EXIST)
        existed = False
    before = {}
    for alias in (registry.CHALLENGER, registry.CHAMPION):
        current = registry.version_for(name, alias) if existed else None
        before[alias] = str(current.version) if current else None
    versions: dict[str, str] = {}
    example = [str(data.item_ids[i]) for i in data.sequence(0)[-5:]]
    try:
        for kind, folder in folders.items():
            versions[kind] = registry.log_and_register(folder, name, example, {"item_map_sha256": data.item_map_sha256})
            tags = {"dataset": str(data.manifest["input"]["name"]), config.metric: str(scores[kind]),
                    "pipeline_run_id": os.environ.get("E4SREC_PIPELINE_RUN_ID", ""),
                    "gate": "candidate" if kind == decision["candidate"] else "not the run's candidate"}
            for key, value in tags.items():
                mc.set_model_version_tag(name, versions[kind], mlflow_key(key), value)
        chosen = versions[decision["candidate"]]
        value = {config.metric: scores[decision["candidate"]]}
        with registry.alias_lock(name):
            registry.move_alias(name, registry.CHALLENGER, chosen, "the run's candidate, registered by deploy", value)
            if apply and decision["promote"]:
                registry.move_alias(name, registry.CHAMPION, chosen, decision["reason"], value,
                                    forced=decision["forced"])
    except BaseException:
        _undo(name, existed, before, versions)
        raise
    return versions


def _undo(name: str, existed: bool, aliases: dict[str, Any], versions: dict[str, str]) -> None:
    """Put the registry back as it was before `_register` (best effort: the original error is what matters)."""
    mc = registry.client()
    try:
        if not existed:
            mc.delete_registered_model(name)
            return
        registry.restore_aliases(name, aliases)
        for version in versions.values():
            mc.delete_model_version(name, version)
    except Exception as e:  # noqa: BLE001
        print(f"warning: could not undo the registration of {name} versions {list(versions.values())}: {e}")


def check(config: DeployConfig, model_dir: Path | str, sasrec_dir: Path | str, data_dir: Path | str,
          output: Path | str, overwrite: bool = False) -> None:
    """Refuse, before any work, an output that is not free or that overlaps the inputs."""
    preflight(output, overwrite, {"--model": model_dir, "--sasrec": sasrec_dir, "--data": data_dir})


def run(config: DeployConfig, model_dir: Path | str, sasrec_dir: Path | str, data_dir: Path | str,
        output: Path | str, *, apply: bool = True, overwrite: bool = False, tracker: Tracker | None = None
        ) -> dict[str, float]:
    """Score the run's E4SRec (`model_dir`), its SASRec and the champion; register both; write the verdict
    (`read_verdict(output)`). The registry needs a tracker; with tracking turned off (`run_tracked(...,
    tracking=False)`, as the pipeline's `tracking` parameter does) nothing is registered and the verdict
    is "hold"."""
    if tracker is None:
        raise E4SRecError("deploy registers models in MLflow; run it with tracking on (drop --no-tracking)")
    check(config, model_dir, sasrec_dir, data_dir, output, overwrite)
    if not tracker.enabled:
        with staged_output(output, overwrite) as out:
            c.write_json(out / VERDICT, {"promote": False, "reason": "tracking is off"})
        return {"deploy/promote": 0.0}
    folders = {"e4srec": Path(fetch(model_dir)), "sasrec": Path(fetch(sasrec_dir))}
    data = c.load_sequence_data(fetch(data_dir))
    for kind, folder in folders.items():
        found, meta = trained.read_config(folder)
        if found != kind:
            raise E4SRecError(f"{folder}: a {LABELS[found]} model where the {LABELS[kind]} model belongs; pass the "
                              f"train-e4srec output as --model and pretrain-sasrec's as --sasrec")
        c.check_item_map_hash(meta.get("item_map_sha256"), data.item_map_sha256, str(folder / trained.CONFIG),
                              "deploy it with the data it was trained on")
    name = config.registered_model or registry.default_name(data.manifest)
    users = seeded_subset(data.n_users, config.eval_users, config.seed)
    t0 = time.perf_counter()
    scores = {kind: _score(folder, data, config, users) for kind, folder in folders.items()}
    champion = _champion(name, data, config, users)
    decision = decide(config, scores, champion)
    tracker.log_params(cfg.to_dict(config) | {"registered_model": name})
    metrics = {"deploy/e4srec": scores["e4srec"], "deploy/sasrec": scores["sasrec"],
               "deploy/promote": float(decision["promote"]), "deploy/seconds": time.perf_counter() - t0}
    if champion and champion["value"] is not None:
        metrics["deploy/champion"] = champion["value"]
    with staged_output(output, overwrite) as out:
        versions = _register(name, folders, data, config, scores, decision, apply)
        verdict = {"registered_model": name, "metric": config.metric,
                   "users": len(users) if users is not None else data.n_users, "min_margin": config.min_margin,
                   "scores": scores, "versions": versions, "candidate": decision["candidate"],
                   "challenger_version": versions[decision["candidate"]],
                   "challenger_value": scores[decision["candidate"]],
                   "champion_version": champion["version"] if champion else None,
                   "champion_kind": champion["kind"] if champion else None,
                   "champion_value": champion["value"] if champion else None,
                   "promote": decision["promote"], "forced": decision["forced"], "reason": decision["reason"]}
        c.write_json(out / VERDICT, verdict)
        c.write_json(out / c.METRICS, metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(out / VERDICT)
    return metrics


def read_verdict(output: Path | str) -> dict[str, Any]:
    """The verdict.json a deploy run wrote into `output` (a folder or its S3 URI)."""
    return c.read_json(Path(fetch(output)) / VERDICT)


def summary(verdict: dict) -> list[str]:
    """The verdict as the lines `e4srec run`, `e4srec deploy` and the report print."""
    v = verdict["versions"]
    return [f"{verdict['registered_model']}: E4SRec version {v['e4srec']}, SASRec version {v['sasrec']} registered; "
            f"challenger = version {verdict['challenger_version']} ({LABELS[verdict['candidate']]})",
            f"gate ({verdict['users']:,} users): {'PROMOTE' if verdict['promote'] else 'hold'}: {verdict['reason']}"]


def promote_champion(verdict_dir: Path | str, actor: str = "") -> dict:
    """Point `champion` at the version a verdict approved, recording the move (the pipeline's step under
    dsl.If on the verdict); the move as `registry.describe` prints it."""
    decision = read_verdict(verdict_dir)
    if actor:
        os.environ.setdefault("E4SREC_ACTOR", actor)
    return registry.move_alias(decision["registered_model"], registry.CHAMPION, decision["challenger_version"],
                               decision["reason"], {decision["metric"]: decision["challenger_value"]},
                               forced=bool(decision.get("forced")))


run_tracked = tracked(STAGE, check)(run)
