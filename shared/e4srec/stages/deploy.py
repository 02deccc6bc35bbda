"""Stage deploy: package E4SRec for MLflow, register it as the challenger, and judge it against the champion.

The verdict (promote or not) is this stage's output; moving `champion` is a separate step the pipeline
runs under `dsl.If` on it (the CLI applies it at once unless `--no-apply`). Both models are evaluated
on the same users of the same test split; the challenger wins when its metric beats the champion's by
at least `min_margin`. With no champion yet, `when_no_champion` decides; `force_promote` overrides.
A champion trained on another item map cannot be scored on this data: the verdict is then "hold"
unless forced.

Output folder: verdict.json (versions, metric values, decision, reason), metrics.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from e4srec import config as cfg
from e4srec import contracts as c
from e4srec import registry
from e4srec.data import seeded_subset
from e4srec.device import resolve_device
from e4srec.errors import E4SRecError
from e4srec.evaluate import evaluate
from e4srec.outputs import preflight, staged_output
from e4srec.stages import train_e4srec
from e4srec.storage import fetch
from e4srec.tracking import Tracker, mlflow_key, stage_run

STAGE = "deploy"
VERDICT = "verdict.json"


@dataclass
class DeployConfig:
    """Settings of deploy (CLI flags, KFP parameters and verdict.json share them)."""

    registered_model: str = cfg.option("", "registered model name (default: e4srec-<dataset>, one per dataset)")
    metric: str = cfg.option("test/full/NDCG@10", "metric the gate compares (a metrics.json key)")
    min_margin: float = cfg.option(0.0, "the challenger must beat the champion by at least this much")
    when_no_champion: str = cfg.option("promote", "first run, no champion yet: promote or hold",
                                       choices=("promote", "hold"))
    force_promote: bool = cfg.option(False, "promote whatever the comparison says (manual override)")
    eval_users: int = cfg.option(0, "compare on this many users drawn with the seed (0: all)")
    eval_batch_size: int = cfg.option(64, "users per scoring batch")
    seed: int = cfg.option(42, "seed for the user sample")
    device: str = cfg.option("auto", "cpu, cuda, cuda:N or auto")

    def __post_init__(self) -> None:
        cfg.check_choices(self)
        split, _, rest = self.metric.partition("/")
        cfg.require(split in c.SPLITS and "/" in rest, self, "metric", "expected <split>/<protocol>/<metric>, "
                    "e.g. test/full/NDCG@10")
        cfg.require(self.eval_users >= 0, self, "eval_users", "must be >= 0")


def _score(model_dir: Path, data: c.SequenceData, config: DeployConfig, users: np.ndarray | None) -> dict[str, float]:
    device = resolve_device(config.device)
    model = train_e4srec.load_model(model_dir, device)
    cache = model.prefix_cache()
    split = config.metric.split("/")[0]
    return evaluate(lambda h: model.score_all_items(h, cache), data, split, batch_size=config.eval_batch_size,
                    device=device, users=users, progress=True).metrics()


def _champion_dir(name: str) -> Path:
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}@{registry.CHAMPION}"))
    flavor = mlflow.models.Model.load(str(local / "MLmodel")).flavors["python_function"]
    return local / flavor["artifacts"]["e4srec"]["path"]  # where MLflow put the logged model folder


def run(config: DeployConfig, model_dir: Path | str, data_dir: Path | str, output: Path | str, *,
        apply: bool = True, overwrite: bool = False, tracker: Tracker | None = None) -> tuple[dict[str, float], dict]:
    """Register `model_dir` as the challenger, compare with the champion, write and return the verdict."""
    tracker = tracker or Tracker(None)
    if not tracker.enabled:
        raise E4SRecError("deploy registers models in MLflow; run it with tracking on (drop --no-tracking)")
    preflight(output, overwrite)
    model_dir = Path(fetch(model_dir))
    data = c.load_sequence_data(fetch(data_dir))
    meta = c.read_json(model_dir / train_e4srec.CONFIG)
    c.check_item_map_hash(meta.get("item_map_sha256"), data.item_map_sha256, str(model_dir / train_e4srec.CONFIG),
                          "deploy it with the data it was trained on")
    name = config.registered_model or registry.default_name(data.manifest)
    users = seeded_subset(data.n_users, config.eval_users, config.seed)
    t0 = time.perf_counter()
    challenger = _score(model_dir, data, config, users)
    tracker.log_params(cfg.to_dict(config) | {"registered_model": name})
    example = [str(data.item_ids[i]) for i in data.sequence(0)[-5:]]
    version = registry.log_and_register(model_dir, name, example, {"item_map_sha256": data.item_map_sha256})
    client = registry.client()
    for key, value in {"item_map_sha256": data.item_map_sha256, "backbone": meta["llm"]["backbone"],
                       config.metric: str(challenger[config.metric]), "dataset": str(data.manifest["input"]["name"])
                       }.items():
        client.set_model_version_tag(name, version, mlflow_key(key), value)
    registry.move_alias(name, registry.CHALLENGER, version, "registered by deploy",
                        {config.metric: challenger[config.metric]})

    champion = registry.version_for(name, registry.CHAMPION)
    champion_value = None
    if champion is None:
        promote = config.when_no_champion == "promote"
        reason = f"no champion yet: when_no_champion={config.when_no_champion}"
    elif registry.item_map_of(name, str(champion.version)) != data.item_map_sha256:
        promote, reason = False, (f"champion version {champion.version} has another item map: not comparable on "
                                  f"this data (force_promote to override)")
    else:
        champion_value = _score(_champion_dir(name), data, config, users)[config.metric]
        promote = challenger[config.metric] >= champion_value + config.min_margin
        reason = (f"{config.metric}: challenger {challenger[config.metric]:.5f} vs champion {champion_value:.5f}, "
                  f"margin {config.min_margin}: {'beats' if promote else 'does not beat'} it")
    if config.force_promote:
        promote, reason = True, f"forced ({reason})"
    verdict = {"registered_model": name, "challenger_version": version,
               "champion_version": str(champion.version) if champion else None, "metric": config.metric,
               "challenger_value": challenger[config.metric], "champion_value": champion_value,
               "min_margin": config.min_margin, "promote": promote, "reason": reason,
               "users": len(users) if users is not None else data.n_users}
    metrics = {"deploy/challenger": challenger[config.metric], "deploy/promote": float(promote),
               "deploy/seconds": time.perf_counter() - t0}
    if champion_value is not None:
        metrics["deploy/champion"] = champion_value
    with staged_output(output, overwrite) as out:
        c.write_json(out / VERDICT, verdict)
        c.write_json(out / c.METRICS, metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(out / VERDICT)
    if apply and promote:
        registry.move_alias(name, registry.CHAMPION, version, reason, {config.metric: challenger[config.metric]})
    return metrics, verdict


def run_tracked(config: DeployConfig, model_dir: Path | str, data_dir: Path | str, output: Path | str, *,
                apply: bool = True, overwrite: bool = False, tracking: bool = True, experiment: str = "e4srec",
                pipeline_run_id: str = "", pipeline_run_name: str = "") -> tuple[dict[str, float], dict]:
    """`run` inside the stage's MLflow run (the model is logged into it)."""
    with stage_run(STAGE, enabled=tracking, experiment=experiment, pipeline_run_id=pipeline_run_id,
                   pipeline_run_name=pipeline_run_name) as tracker:
        return run(config, model_dir, data_dir, output, apply=apply, overwrite=overwrite, tracker=tracker)
