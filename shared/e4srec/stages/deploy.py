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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from e4srec import config as cfg
from e4srec import contracts as c
from e4srec import registry, trained
from e4srec.data import seeded_subset
from e4srec.device import resolve_device
from e4srec.errors import E4SRecError
from e4srec.evaluate import METRICS, PROTOCOLS, evaluate
from e4srec.outputs import preflight, staged_output
from e4srec.storage import fetch
from e4srec.tracking import Tracker, mlflow_key, stage_run

STAGE = "deploy"
VERDICT = "verdict.json"
LABELS = trained.LABELS  # E4SRec, SASRec: how verdicts name the kinds


@dataclass
class DeployConfig:
    """Settings of deploy (CLI flags, KFP parameters and verdict.json share them)."""

    registered_model: str = cfg.option("", "registered model name (default: e4srec-<dataset>, one per dataset)")
    metric: str = cfg.option("test/full/NDCG@10", "metric the gate compares (a metrics.json key)")
    min_margin: float = cfg.option(0.0, "the candidate must beat the champion by more than this")
    when_no_champion: str = cfg.option("promote", "first run, no champion yet: promote or hold",
                                       choices=("promote", "hold"))
    force_promote: bool = cfg.option(False, "make the run's E4SRec champion whatever the scores say (recorded as forced)")
    eval_users: int = cfg.option(0, "compare on this many users drawn with the seed (0: all)")
    eval_batch_size: int = cfg.option(64, "users per scoring batch")
    seed: int = cfg.option(42, "seed for the user sample")
    device: str = cfg.option("auto", "cpu, cuda, cuda:N or auto")

    def __post_init__(self) -> None:
        cfg.check_fields(self)
        parts = self.metric.split("/")
        cfg.require(len(parts) == 3 and parts[0] in c.SPLITS and parts[1] in PROTOCOLS and parts[2] in METRICS, self,
                    "metric", f"expected <split>/<protocol>/<metric> with split in {'/'.join(c.SPLITS)}, protocol in "
                    f"{'/'.join(PROTOCOLS)}, metric in {', '.join(METRICS)}; e.g. test/full/NDCG@10")
        cfg.require(self.min_margin >= 0, self, "min_margin", "must be >= 0")
        cfg.require(self.eval_users >= 0, self, "eval_users", "must be >= 0")


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


def run(config: DeployConfig, model_dir: Path | str, sasrec_dir: Path | str, data_dir: Path | str,
        output: Path | str, *, apply: bool = True, overwrite: bool = False, tracker: Tracker | None = None
        ) -> tuple[dict[str, float], dict]:
    """Score the run's E4SRec (`model_dir`), its SASRec and the champion; register both; write the verdict."""
    tracker = tracker or Tracker(None)
    if not tracker.enabled:
        raise E4SRecError("deploy registers models in MLflow; run it with tracking on (drop --no-tracking)")
    preflight(output, overwrite, {"--model": model_dir, "--sasrec": sasrec_dir, "--data": data_dir})
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
    return metrics, verdict


def summary(verdict: dict) -> list[str]:
    """The verdict as the lines `e4srec run`, `e4srec deploy` and the report print."""
    v = verdict["versions"]
    return [f"{verdict['registered_model']}: E4SRec version {v['e4srec']}, SASRec version {v['sasrec']} registered; "
            f"challenger = version {verdict['challenger_version']} ({LABELS[verdict['candidate']]})",
            f"gate ({verdict['users']:,} users): {'PROMOTE' if verdict['promote'] else 'hold'}: {verdict['reason']}"]


def run_tracked(config: DeployConfig, model_dir: Path | str, sasrec_dir: Path | str, data_dir: Path | str,
                output: Path | str, *, apply: bool = True, overwrite: bool = False, tracking: bool = True,
                experiment: str = "e4srec", pipeline_run_id: str = "", pipeline_run_name: str = ""
                ) -> tuple[dict[str, float], dict]:
    """`run` inside the stage's MLflow run (the models are logged into it)."""
    # before the MLflow run: a refused output leaves no FAILED run behind
    preflight(output, overwrite, {"--model": model_dir, "--sasrec": sasrec_dir, "--data": data_dir})
    with stage_run(STAGE, enabled=tracking, experiment=experiment, pipeline_run_id=pipeline_run_id,
                   pipeline_run_name=pipeline_run_name) as tracker:
        return run(config, model_dir, sasrec_dir, data_dir, output, apply=apply, overwrite=overwrite, tracker=tracker)
