"""Environment profiles: what differs between one machine and a cluster, kept out of pipeline code.

A profile is a YAML file (`profiles/local.yaml`, `profiles/cluster.yaml`, or any path) with: the
images, the pipeline root, plain environment variables for every task, Kubernetes secrets mapped to
environment variables, GPU settings for the LLM stages, and caching. `{version}` in an image name is
the installed e4srec version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from e4srec.errors import E4SRecError
from e4srec.images import VERSION

PROFILES = Path(__file__).parent / "profiles"
# The task names the pipeline configures (pipeline.py); pod settings are keyed by them.
STAGES = ("prepare-data", "pretrain-sasrec", "instruction-tune", "instruction-tune (skipped)", "train-e4srec", "deploy",
          "promote-champion", "batch-recommend", "report")


@dataclass
class Profile:
    name: str
    image: str
    gpu_image: str
    pipeline_root: str = ""
    env: dict[str, str] = field(default_factory=dict)
    secrets: list[dict[str, Any]] = field(default_factory=list)
    gpu: dict[str, Any] = field(default_factory=dict)
    caching: dict[str, Any] = field(default_factory=dict)
    # instruction-tune under dsl.If/dsl.Else, so that a pass-through never holds a GPU, its backbone
    # artifact picked by dsl.OneOf. kfp.local (2.17) cannot pick an artifact between branches, so the
    # local profile turns this off: one task that passes the base through itself when tuning is off.
    instruction_tune_branches: bool = True
    # Pod settings: {stage or "default": {cpu_request, cpu_limit, memory_request, memory_limit, retries, shm_size}}
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    image_pull_secrets: list[str] = field(default_factory=list)
    # train-e4srec checkpoints on a PVC, so that a retried pod resumes: {pvc, mount_path, every}
    checkpoints: dict[str, Any] = field(default_factory=dict)

    POD_KEYS = ("cpu_request", "cpu_limit", "memory_request", "memory_limit", "retries", "shm_size")

    def pod(self, stage: str) -> dict[str, Any]:
        """The stage's pod settings: its own over the defaults ("instruction-tune (skipped)", the
        pass-through, is a stage of its own: it only writes backbone.json)."""
        return {**self.pods.get("default", {}), **self.pods.get(stage, {})}

    def is_gpu_stage(self, stage: str) -> bool:
        return stage in self.gpu.get("stages", [])

    def caching_for(self, stage: str) -> bool:
        return bool(self.caching.get("default", False)) and stage not in self.caching.get("disabled_for", [])


def load_profile(name_or_path: str | Path) -> Profile:
    """`local`, `cluster`, or a path to a profile YAML."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise E4SRecError(f"profile {name_or_path!r}: not found (built in: {known}; or give a path to a YAML file)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise E4SRecError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    caching = raw.get("caching") or {}
    if not all(isinstance(k, str) for k in caching):  # YAML 1.1 reads a bare `off:` or `no:` key as a boolean
        raise E4SRecError(f"{path}: caching keys must be `default` and `disabled_for`")
    unknown = set(raw) - set(Profile.__dataclass_fields__)
    if unknown:
        raise E4SRecError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}")
    for key in ("name", "image", "gpu_image"):
        if not raw.get(key):
            raise E4SRecError(f"{path}: missing field {key!r}")
    for stage, settings in (raw.get("pods") or {}).items():
        if stage != "default" and stage not in STAGES:
            raise E4SRecError(f"{path}: pods.{stage}: no such stage (stages: default, {', '.join(STAGES)})")
        if not isinstance(settings, dict):
            raise E4SRecError(f"{path}: pods.{stage}: expected a mapping of settings, e.g. {{memory_limit: 16Gi}}")
        bad = set(settings or {}) - set(Profile.POD_KEYS)
        if bad:
            raise E4SRecError(f"{path}: pods.{stage}: unknown setting(s) {', '.join(sorted(bad))} (known: "
                              f"{', '.join(Profile.POD_KEYS)})")
    if raw.get("checkpoints") and not {"pvc", "mount_path"} <= set(raw["checkpoints"]):
        raise E4SRecError(f"{path}: checkpoints needs pvc and mount_path (and optionally every)")
    for i, secret in enumerate(raw.get("secrets") or []):
        if not secret.get("name") or not isinstance(secret.get("env"), dict):
            raise E4SRecError(f"{path}: secrets[{i}] needs a name and an env mapping (secret key: variable)")
    raw["image"] = raw["image"].format(version=VERSION)
    raw["gpu_image"] = raw["gpu_image"].format(version=VERSION)
    raw = {k: v for k, v in raw.items() if v is not None}
    return Profile(**raw)
