"""Environment profiles: what differs between one machine and a cluster, kept out of pipeline code.

A profile is a YAML file (`profiles/local.yaml`, `profiles/cluster.yaml`, or any path) with: the
images, the pipeline root, plain environment variables for every task, Kubernetes secrets mapped to
environment variables, GPU settings for the LLM stages, and caching. `{version}` in an image name is
the installed e4srec version.
"""

from __future__ import annotations

import re
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


# Kubernetes resource quantities (apimachinery/pkg/api/resource: 500m, 2, 1.5, 16Gi, 1e3, ...).
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?([eE][0-9]+|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
TOLERATION_KEYS = ("key", "operator", "value", "effect", "toleration_seconds")


class _Fields:
    """Checks one profile YAML's fields, each defect one line naming the file and the field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field_name: str, problem: str) -> E4SRecError:
        return E4SRecError(f"{self.path}: {field_name}: {problem}")

    def kind(self, field_name: str, value: Any, kinds: type | tuple[type, ...], example: str) -> Any:
        if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
            raise self.fail(field_name, f"expected {example}, got {value!r} (quote it in YAML if it is a string)")
        if not isinstance(value, kinds):
            raise self.fail(field_name, f"expected {example}, got {type(value).__name__} {value!r}")
        return value

    def strings(self, field_name: str, value: Any, example: str) -> dict[str, str]:
        self.kind(field_name, value, dict, f"a mapping, e.g. {example}")
        for key, item in value.items():
            self.kind(f"{field_name}.{key}", key, str, "a string key")
            self.kind(f"{field_name}.{key}", item, str, f"a string (quote numbers and booleans: {key}: \"{item}\")")
        return value

    def names(self, field_name: str, value: Any, known: tuple[str, ...] | None = None) -> list[str]:
        self.kind(field_name, value, list, "a list of names, e.g. [train-e4srec]")
        for i, item in enumerate(value):
            self.kind(f"{field_name}[{i}]", item, str, "a name")
            if known is not None and item not in known:
                raise self.fail(f"{field_name}[{i}]", f"no such stage {item!r} (stages: {', '.join(known)})")
        return value


def load_profile(name_or_path: str | Path) -> Profile:
    """`local`, `cluster`, or a path to a profile YAML; any defect in the file is one line naming it and the field."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise E4SRecError(f"profile {name_or_path!r}: not found (built in: {known}; or give a path to a YAML file)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise E4SRecError(f"{path}: not UTF-8 text; a profile is a YAML file (see pipelines/profiles/cluster.yaml)") from None
    except yaml.YAMLError as e:
        raise E4SRecError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    f = _Fields(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise E4SRecError(f"{path}: expected a mapping of profile fields (name, image, ...), got a "
                          f"{type(raw).__name__}; see pipelines/profiles/cluster.yaml")
    bad_keys = [k for k in raw if not isinstance(k, str)]
    if bad_keys:  # YAML 1.1 reads a bare `off:` or `no:` key as a boolean
        raise E4SRecError(f"{path}: field name {bad_keys[0]!r} is not a string (quote it in YAML)")
    unknown = set(raw) - set(Profile.__dataclass_fields__)
    if unknown:
        raise E4SRecError(f"{path}: unknown field(s) {', '.join(sorted(unknown))} (known: "
                          f"{', '.join(Profile.__dataclass_fields__)})")
    raw = {k: v for k, v in raw.items() if v is not None}
    for key in ("name", "image", "gpu_image"):
        if not raw.get(key):
            raise E4SRecError(f"{path}: missing field {key!r}")
        f.kind(key, raw[key], str, "a string")
    f.kind("pipeline_root", raw.get("pipeline_root", ""), str, "a URI such as s3://bucket/root, or empty")
    f.strings("env", raw.get("env", {}), "{MLFLOW_TRACKING_URI: http://mlflow:5000}")
    f.kind("secrets", raw.get("secrets", []), list, "a list of {name, env} mappings")
    for i, secret in enumerate(raw.get("secrets", [])):
        where = f"secrets[{i}]"
        f.kind(where, secret, dict, "a mapping {name: SECRET, env: {key: VARIABLE}}")
        if not secret.get("name") or "env" not in secret:
            raise f.fail(where, "needs a name and an env mapping (secret key: variable)")
        f.kind(f"{where}.name", secret["name"], str, "a secret name")
        f.strings(f"{where}.env", secret["env"], "{access-key: AWS_ACCESS_KEY_ID}")
        f.kind(f"{where}.optional", secret.get("optional", False), bool, "true or false")
        extra = set(secret) - {"name", "env", "optional"}
        if extra:
            raise f.fail(where, f"unknown key(s) {', '.join(sorted(extra))} (known: name, env, optional)")
    gpu = f.kind("gpu", raw.get("gpu", {}), dict, "a mapping {stages, accelerator, count, node_selector, tolerations}")
    extra = set(gpu) - {"stages", "accelerator", "count", "node_selector", "tolerations"}
    if extra:
        raise f.fail("gpu", f"unknown key(s) {', '.join(sorted(extra))} (known: stages, accelerator, count, "
                             "node_selector, tolerations)")
    stages = f.names("gpu.stages", gpu.get("stages", []), STAGES)
    if stages and not gpu.get("accelerator"):
        raise f.fail("gpu.accelerator", "missing: GPU stages need an accelerator type, e.g. nvidia.com/gpu")
    f.kind("gpu.accelerator", gpu.get("accelerator", ""), str, "an accelerator type, e.g. nvidia.com/gpu")
    if f.kind("gpu.count", gpu.get("count", 1), int, "a whole number of GPUs, e.g. 1") < 1:
        raise f.fail("gpu.count", f"must be >= 1, got {gpu['count']}")
    f.strings("gpu.node_selector", gpu.get("node_selector", {}), '{nvidia.com/gpu.present: "true"}')
    f.kind("gpu.tolerations", gpu.get("tolerations", []), list, "a list of {key, operator, effect} mappings")
    for i, toleration in enumerate(gpu.get("tolerations", [])):
        f.kind(f"gpu.tolerations[{i}]", toleration, dict, "a mapping {key, operator, effect}")
        extra = set(toleration) - set(TOLERATION_KEYS)
        if extra:
            raise f.fail(f"gpu.tolerations[{i}]", f"unknown key(s) {', '.join(sorted(extra))} (known: "
                                                  f"{', '.join(TOLERATION_KEYS)})")
    caching = f.kind("caching", raw.get("caching", {}), dict, "a mapping {default: true, disabled_for: [...]}")
    if not all(isinstance(k, str) for k in caching) or set(caching) - {"default", "disabled_for"}:
        raise f.fail("caching", "keys must be `default` and `disabled_for`")
    f.kind("caching.default", caching.get("default", False), bool, "true or false")
    f.names("caching.disabled_for", caching.get("disabled_for", []), STAGES)
    f.kind("instruction_tune_branches", raw.get("instruction_tune_branches", True), bool, "true or false")
    pods = f.kind("pods", raw.get("pods", {}), dict, "a mapping of stage -> settings, e.g. {default: {retries: 2}}")
    for stage, settings in pods.items():
        if stage != "default" and stage not in STAGES:
            raise f.fail(f"pods.{stage}", f"no such stage (stages: default, {', '.join(STAGES)})")
        f.kind(f"pods.{stage}", settings, dict, "a mapping of settings, e.g. {memory_limit: 16Gi}")
        bad = set(settings) - set(Profile.POD_KEYS)
        if bad:
            raise f.fail(f"pods.{stage}", f"unknown setting(s) {', '.join(sorted(bad))} (known: "
                                          f"{', '.join(Profile.POD_KEYS)})")
        for key, value in settings.items():
            where = f"pods.{stage}.{key}"
            if key == "retries":
                if f.kind(where, value, int, "a whole number of retries, e.g. 2") < 0:
                    raise f.fail(where, f"must be >= 0, got {value}")
            elif not QUANTITY.match(str(f.kind(where, value, (str, int, float), "a Kubernetes quantity, e.g. 16Gi"))):
                raise f.fail(where, f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 16Gi)")
    f.names("image_pull_secrets", raw.get("image_pull_secrets", []))
    checkpoints = f.kind("checkpoints", raw.get("checkpoints", {}), dict, "a mapping {pvc, mount_path, every}")
    if checkpoints:
        if not {"pvc", "mount_path"} <= set(checkpoints):
            raise f.fail("checkpoints", "needs pvc and mount_path (and optionally every)")
        extra = set(checkpoints) - {"pvc", "mount_path", "every"}
        if extra:
            raise f.fail("checkpoints", f"unknown key(s) {', '.join(sorted(extra))} (known: pvc, mount_path, every)")
        f.kind("checkpoints.pvc", checkpoints["pvc"], str, "a PersistentVolumeClaim name")
        if not f.kind("checkpoints.mount_path", checkpoints["mount_path"], str, "an absolute path").startswith("/"):
            raise f.fail("checkpoints.mount_path", f"must be an absolute path, got {checkpoints['mount_path']!r}")
        if f.kind("checkpoints.every", checkpoints.get("every", 500), int, "a number of steps, e.g. 500") < 1:
            raise f.fail("checkpoints.every", f"must be >= 1, got {checkpoints['every']}")
    for key in ("image", "gpu_image"):
        try:
            raw[key] = raw[key].format(version=VERSION)
        except (KeyError, IndexError, ValueError) as e:
            raise f.fail(key, f"{raw[key]!r}: only {{version}} may appear in braces ({e})") from None
    return Profile(**raw)
