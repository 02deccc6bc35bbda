"""Run a compiled KFP pipeline (IR YAML) the way the Kubeflow Pipelines v2 backend does, without a cluster.

No Kubernetes, Argo or MLMD here: one process plays the driver, the launcher and the cache server,
following the rules of kubeflow/pipelines at tag 2.17.0 as its source states them (each rule below
names the file and function it follows). Spec features it does not emulate it refuses in one line
rather than guess (ParallelFor, importers, unknown placeholders). What Kubernetes does with a pod
(resources, node selectors, tolerations, retries, empty-dir volumes, image pull secrets, the image
itself) is out of its scope: every task runs once, here, and those settings are checked in the
compiled platform spec by tests/test_pipeline.py instead.

- **Pipeline root**: the run's runtime config, never the spec's `defaultPipelineRoot` (driver/root_dag.go
  RootDAG: `opts.RuntimeConfig.GetGcsOutputDirectory()`, else the kfp-launcher ConfigMap's default).
- **Output URIs**: `<root>/<pipeline name>/<run id>/<task name>/<uuid4>/<output name>`
  (metadata/client.go GetPipeline and GenerateOutputURI; driver/driver.go provisionOutputs, salted
  with `uuid.NewString()` in driver/container.go Container). Output parameters go to
  `/tmp/kfp/outputs/<name>`, the executor output file to `<local task root>/output_metadata.json`.
- **Inputs**: parameters from the parent DAG's inputs, upstream outputs and constants with the
  `{{$.pipeline_job_*}}` placeholders filled in (driver/resolve.go resolveInputs,
  resolveInputParameter); component defaults added by the launcher (component/launcher_v2.go
  addDefaultParams); artifacts from upstream tasks, as RuntimeArtifacts named by their MLMD id
  (metadata/converter.go toRuntimeArtifact).
- **Conditions**: the task's `triggerPolicy.condition`, CEL over `inputs.parameter_values`
  (expression/expression.go Condition); a false one leaves the task not triggered.
- **dsl.OneOf**: the first selector whose producer is COMPLETE or CACHED (driver/resolve.go
  GetProducerTask).
- **Launcher**: input artifacts downloaded from the object store to `LocalPathForURI(uri)` (`s3://b/k`
  -> `/s3/b/k`; launcher_v2.go downloadArtifacts, objectstore/object_store.go DownloadBlob); the
  placeholders `{{$}}` and `{{$.inputs...}}` substituted into command and args (compileCmdAndArgs,
  getPlaceholders); the command run; the executor output file read (getExecutorOutputFile), output
  parameters missing from it read from their files (collectOutputParameters); each output artifact's
  local path uploaded with plain object writes, a folder recursively, nothing else added, a missing
  path only a warning (uploadOutputArtifacts, object_store.go UploadBlob).
- **Cache**: sha256 of the JSON of the input artifacts' names, the input parameter values, the output
  specs (URIs wiped), image, command + args and PVC names (driver/cache.go getFingerPrint,
  cacheutils/cache.go GenerateCacheKey), scoped to the pipeline name; a hit reuses the earlier
  execution's outputs, artifacts and all, and runs nothing (driver/cache.go reuseCachedOutputs).

Two things the harness must place differently, since its "pods" share one machine and no container:
the `/s3/` mount and `/tmp/kfp/outputs/` live under a per-task folder (the pod's filesystem), and the
KFP SDK in the task learns the moved `/s3/` prefix from a `sitecustomize.py` the harness puts first on
`PYTHONPATH`. A PVC (`pvcMount`) is a folder shared by every task that mounts it; a parameter value
under its mount path points there. The image's Python is the one running the harness (`python3`
first on `PATH`).
Environment variables come only from the container spec, the platform spec's `secretAsEnv` (from the
secrets given to the harness, as Kubernetes Secrets) and `fieldPathAsEnv` (pod labels, with
`pipeline/runid` set as the API server sets it: apiserver/template/v2_template.go RunWorkflow).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

COMPLETE, CACHED, NOT_TRIGGERED, FAILED = "COMPLETE", "CACHED", "NOT_TRIGGERED", "FAILED"
OUTPUT_PARAMETERS_DIR = "/tmp/kfp/outputs"  # driver/driver.go provisionOutputs
SITECUSTOMIZE = '''\
import os
_root = os.environ.get("KFP_HARNESS_POD_ROOT")
if _root:  # the pod's /s3/ mount lives under the task's folder (see tests/kfp_backend/harness.py)
    from kfp.dsl.types import artifact_types as _t
    _t._S3_LOCAL_MOUNT_PREFIX = _root + "/s3/"
'''


class HarnessError(RuntimeError):
    """The pipeline cannot run as the backend would run it (a failed task, an unresolvable input)."""


@dataclass
class TaskRecord:
    """One executed (or skipped, or cached) task of a run."""

    name: str
    state: str
    fingerprint: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)  # output parameters
    artifacts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # output RuntimeArtifacts
    log: Path | None = None


@dataclass
class RunResult:
    run_id: str
    pipeline_root: str
    tasks: dict[str, TaskRecord]  # by task path, e.g. "condition-branches-1/condition-3/instruction-tune-skipped"
    outputs: dict[str, Any]
    parameters: dict[str, Any] = field(default_factory=dict)  # the runtime config's
    seconds: float = 0.0

    def task(self, name: str) -> TaskRecord:
        """The record of the task whose own name (the last part of its path) is `name`."""
        found = [r for path, r in self.tasks.items() if path.split("/")[-1] == name]
        if len(found) != 1:
            raise KeyError(f"{name}: {len(found)} tasks of that name in {sorted(self.tasks)}")
        return found[0]

    def states(self) -> dict[str, str]:
        return {path.split("/")[-1]: r.state for path, r in self.tasks.items()}


# ---------------------------------------------------------------------------------------- CEL subset
_CEL_TOKEN = re.compile(r"""\s*(?:(?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")|(?P<num>\d+(?:\.\d+)?)|"""
                        r"""(?P<op>==|!=|<=|>=|&&|\|\||[!<>()\[\].,])|(?P<id>[A-Za-z_][A-Za-z_0-9]*))""")


def cel_condition(expression: str, parameter_values: dict[str, Any]) -> bool:
    """Evaluate the CEL subset the KFP compiler writes into `triggerPolicy.condition`: comparisons of
    `inputs.parameter_values['...']` (optionally through int(), double(), string()) with literals,
    joined by !, && and ||. Anything else is refused, not guessed."""
    out, pos = [], 0
    while pos < len(expression):
        m = _CEL_TOKEN.match(expression, pos)
        if not m or m.end() == pos:
            if expression[pos:].strip() == "":
                break
            raise HarnessError(f"condition {expression!r}: cannot parse at {expression[pos:]!r}")
        pos = m.end()
        if m.group("str") is not None:
            out.append(repr(json.loads('"' + m.group("str")[1:-1].replace('"', '\\"') + '"')))
        elif m.group("num") is not None:
            out.append(m.group("num"))
        elif m.group("op") is not None:
            op = m.group("op")
            out.append({"&&": " and ", "||": " or ", "!": " not "}.get(op, op))
        else:
            ident = m.group("id")
            mapped = {"true": "True", "false": "False", "inputs": "inputs", "parameter_values": "parameter_values",
                      "int": "int", "double": "float", "string": "str"}.get(ident)
            if mapped is None:
                raise HarnessError(f"condition {expression!r}: {ident!r} is outside the CEL subset KFP compiles")
            out.append(mapped)
    code = "".join(out)

    class Inputs:
        pass

    inputs = Inputs()
    inputs.parameter_values = parameter_values  # type: ignore[attr-defined]
    result = eval(code, {"__builtins__": {}}, {"inputs": inputs, "int": int, "float": float, "str": str,  # noqa: S307
                                              "True": True, "False": False})
    if not isinstance(result, bool):
        raise HarnessError(f"condition {expression!r}: evaluates to {result!r}, not a bool (expression.go Condition)")
    return result


# ------------------------------------------------------------------------------------------- backend
class Backend:
    """A KFP v2 backend for one compiled pipeline: `run(parameters)` executes it; the cache persists
    across runs of the same Backend, as the cache server's table does across runs on a cluster."""

    def __init__(self, spec: Path | str | dict[str, Any], workdir: Path, *, secrets: dict[str, dict[str, str]]
                 | None = None, python: str = sys.executable, s3_endpoint: str | None = None,
                 s3_credentials: tuple[str, str] | None = None, env_overrides: dict[str, str] | None = None,
                 timeout: float = 900) -> None:
        # The compiler writes the pipeline spec, then (after ---) the platform spec with the Kubernetes settings.
        docs = [spec] if isinstance(spec, dict) else list(yaml.safe_load_all(Path(spec).read_text()))
        self.spec = docs[0]
        platforms = docs[1].get("platforms", {}) if len(docs) > 1 else {}
        self.k8s = platforms.get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
        self.workdir = Path(workdir)
        self.secrets = secrets or {}
        self.env_overrides = env_overrides or {}  # what the cluster's service names resolve to here
        self.python = python
        self.timeout = timeout
        self.cache: dict[str, TaskRecord] = {}  # fingerprint -> the execution it reuses
        self._next_artifact_id = 1
        import boto3

        key, secret = s3_credentials or (os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"))
        self.s3 = boto3.client("s3", endpoint_url=s3_endpoint or os.environ.get("AWS_ENDPOINT_URL"),
                               aws_access_key_id=key, aws_secret_access_key=secret, region_name="us-east-1")
        self.site = self.workdir / "site"
        self.site.mkdir(parents=True, exist_ok=True)
        (self.site / "sitecustomize.py").write_text(SITECUSTOMIZE)

    @property
    def pipeline_name(self) -> str:
        return self.spec["pipelineInfo"]["name"]

    # ----------------------------------------------------------------------------------------- run
    def run(self, parameters: dict[str, Any], *, pipeline_root: str, run_name: str = "run") -> RunResult:
        """One pipeline run with these runtime parameters under this pipeline root (the runtime config)."""
        import time

        start = time.time()
        if not pipeline_root.startswith("s3://"):
            raise HarnessError(f"pipeline root {pipeline_root!r}: this harness stores artifacts on S3 only")
        run = _Run(self, str(uuid.uuid4()), run_name, pipeline_root.rstrip("/"))
        defs = self.spec["root"].get("inputDefinitions", {}).get("parameters", {})
        unknown = set(parameters) - set(defs)
        if unknown:
            raise HarnessError(f"unknown pipeline parameter(s) {sorted(unknown)}")
        values = {}
        for name, d in defs.items():
            if name in parameters:
                values[name] = _typed(parameters[name], d["parameterType"], name)
            elif "defaultValue" in d:
                values[name] = d["defaultValue"]
            elif not d.get("isOptional"):
                raise HarnessError(f"pipeline parameter {name!r} is required")
        outputs = run.dag("root", self.spec["root"], values, {})
        return RunResult(run.run_id, pipeline_root, run.records, outputs, dict(parameters), time.time() - start)

    def new_artifact_id(self) -> str:
        self._next_artifact_id += 1
        return str(self._next_artifact_id)

    # ----------------------------------------------------------------------------- object store I/O
    def download(self, uri: str, local: Path) -> None:
        """objectstore/object_store.go DownloadBlob: every object under the key, or the one object."""
        bucket, key = _split(uri)
        found = False
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                k = obj["Key"]
                if not (k == key or k.startswith(key + "/")):  # isBlobKeyUnderPrefix
                    continue
                target = local if k == key else local / k[len(key) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                self.s3.download_file(bucket, k, str(target))
                found = True
        if not found:
            raise HarnessError(f"input artifact {uri}: nothing at that URI in the object store")

    def upload(self, local: Path, uri: str) -> list[str]:
        """object_store.go UploadBlob: a file as one object, a folder file by file; the keys written."""
        bucket, key = _split(uri)
        if local.is_file():
            self.s3.upload_file(str(local), bucket, key)
            return [key]
        keys = []
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            k = f"{key}/{path.relative_to(local).as_posix()}"
            self.s3.upload_file(str(path), bucket, k)
            keys.append(k)
        return keys

    def keys(self, uri: str) -> list[str]:
        bucket, key = _split(uri)
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out


class _Run:
    def __init__(self, backend: Backend, run_id: str, run_name: str, root: str) -> None:
        self.b, self.run_id, self.run_name, self.root = backend, run_id, run_name, root
        self.records: dict[str, TaskRecord] = {}
        self.dag_execution_ids = 0

    # ----------------------------------------------------------------------------------------- DAGs
    def dag(self, path: str, component: dict[str, Any], params: dict[str, Any],
            artifacts: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """Run a DAG's tasks in dependency order (Argo's `depends` on dependentTasks and data), then
        resolve the DAG's outputs."""
        tasks = component["dag"].get("tasks", {})
        done: dict[str, TaskRecord] = {}
        for name in _order(tasks):
            task = tasks[name]
            if "iteratorPolicy" in task or "parameterIterator" in task or "artifactIterator" in task:
                raise HarnessError(f"{name}: ParallelFor is not emulated by this harness")
            record = self.task(f"{path}/{name}" if path != "root" else name, name, task, params, artifacts, done)
            done[name] = record
        return self.dag_outputs(component["dag"].get("outputs", {}), done)

    def dag_outputs(self, spec: dict[str, Any], done: dict[str, TaskRecord]) -> dict[str, Any]:
        out: dict[str, Any] = {"parameters": {}, "artifacts": {}}
        for name, p in spec.get("parameters", {}).items():
            if "valueFromParameter" in p:
                sel = [p["valueFromParameter"]]
            else:  # dsl.OneOf: the first producer that completed (driver/resolve.go GetProducerTask)
                sel = p["valueFromOneof"]["parameterSelectors"]
            for s in sel:
                if (value := _produced(done, s["producerSubtask"], "parameters", s["outputParameterKey"])) is not None:
                    out["parameters"][name] = value
                    break
        for name, a in spec.get("artifacts", {}).items():
            for s in a["artifactSelectors"]:
                if (value := _produced(done, s["producerSubtask"], "artifacts", s["outputArtifactKey"])) is not None:
                    out["artifacts"][name] = value
                    break
        return out

    # ---------------------------------------------------------------------------------------- tasks
    def resolve(self, task_name: str, task: dict[str, Any], params: dict[str, Any],
                artifacts: dict[str, list[dict[str, Any]]], done: dict[str, TaskRecord]
                ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """driver/resolve.go resolveInputs for the input kinds KFP's compiler writes."""
        inputs = task.get("inputs", {})
        values: dict[str, Any] = {}
        for name, spec in inputs.get("parameters", {}).items():
            if "componentInputParameter" in spec:
                src = spec["componentInputParameter"]
                if src not in params:
                    raise HarnessError(f"{task_name}: input {name!r}: parent DAG does not have input parameter {src}")
                values[name] = params[src]
            elif "taskOutputParameter" in spec:
                t = spec["taskOutputParameter"]
                values[name] = _produced(done, t["producerTask"], "parameters", t["outputParameterKey"],
                                         f"{task_name}: input {name!r}")
            elif "runtimeValue" in spec:
                values[name] = self.placeholder(spec["runtimeValue"]["constant"], task_name)
            else:
                raise HarnessError(f"{task_name}: input {name!r}: unsupported parameter source {sorted(spec)}")
        arts: dict[str, list[dict[str, Any]]] = {}
        for name, spec in inputs.get("artifacts", {}).items():
            if "componentInputArtifact" in spec:
                src = spec["componentInputArtifact"]
                if src not in artifacts:
                    raise HarnessError(f"{task_name}: input artifact {name!r}: parent DAG does not have input "
                                       f"artifact {src}")
                arts[name] = artifacts[src]
            elif "taskOutputArtifact" in spec:
                t = spec["taskOutputArtifact"]
                arts[name] = _produced(done, t["producerTask"], "artifacts", t["outputArtifactKey"],
                                       f"{task_name}: input artifact {name!r}")
            else:
                raise HarnessError(f"{task_name}: input artifact {name!r}: unsupported source {sorted(spec)} "
                                   f"(importers are not emulated)")
        return values, arts

    @staticmethod
    def check_types(task_name: str, component: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        """driver/resolve.go handleParamTypeValidationAndConversion: a STRING input takes any value as
        text; a number or bool input refuses a string or a null; a required input must have a value."""
        defs = component.get("inputDefinitions", {}).get("parameters", {})
        out = dict(values)
        for name, d in defs.items():
            if name not in out:
                if "defaultValue" not in d and not d.get("isOptional"):
                    raise HarnessError(f"{task_name}: neither value nor default value provided for non-optional "
                                       f"parameter {name}")
                continue
            value, ptype = out[name], d["parameterType"]
            if value is None:
                raise HarnessError(f"{task_name}: input parameter {name} is null")
            if ptype == "STRING" and not isinstance(value, str):
                out[name] = json.dumps(_protojson(value)) if isinstance(value, (dict, list)) else (
                    str(value).lower() if isinstance(value, bool) else _number(value))
            elif ptype in ("NUMBER_INTEGER", "NUMBER_DOUBLE") and (isinstance(value, (str, bool))):
                raise HarnessError(f"{task_name}: input parameter {name} is a {ptype} but got {value!r}")
            elif ptype == "BOOLEAN" and not isinstance(value, bool):
                raise HarnessError(f"{task_name}: input parameter {name} is a BOOLEAN but got {value!r}")
        return out

    def placeholder(self, value: Any, task_name: str) -> Any:
        """driver/resolve.go resolveInputParameter: the run-time placeholders in a constant."""
        if not isinstance(value, str):
            return value
        known = {"{{$.pipeline_job_name}}": self.run_name, "{{$.pipeline_job_resource_name}}": self.run_name,
                 "{{$.pipeline_job_uuid}}": self.run_id, "{{$.pipeline_task_name}}": task_name}
        if value in known:
            return known[value]
        if value.startswith("{{$."):
            raise HarnessError(f"{task_name}: placeholder {value} is not emulated by this harness")
        return value

    def task(self, path: str, name: str, task: dict[str, Any], params: dict[str, Any],
             artifacts: dict[str, list[dict[str, Any]]], done: dict[str, TaskRecord]) -> TaskRecord:
        component = self.b.spec["components"][task["componentRef"]["name"]]
        values, arts = self.resolve(name, task, params, artifacts, done)
        values = self.check_types(name, component, values)
        condition = task.get("triggerPolicy", {}).get("condition")
        if condition and not cel_condition(condition, values):
            record = TaskRecord(name, NOT_TRIGGERED)
        elif "dag" in component:
            outputs = self.dag(path, component, values, arts)
            record = TaskRecord(name, COMPLETE, parameters=outputs["parameters"], artifacts=outputs["artifacts"])
        else:
            record = self.container(path, name, task, component, values, arts)
        self.records[path] = record
        return record

    def container(self, path: str, name: str, task: dict[str, Any], component: dict[str, Any],
                  values: dict[str, Any], arts: dict[str, list[dict[str, Any]]]) -> TaskRecord:
        label = component["executorLabel"]
        executor = self.b.spec["deploymentSpec"]["executors"][label]
        if "container" not in executor:
            raise HarnessError(f"{name}: executor {label} is not a container (importers are not emulated)")
        container = executor["container"]
        k8s = self.b.k8s.get(label, {})
        pvcs = {m["mountPath"]: m.get("constant") or m["pvcNameParameter"]["runtimeValue"]["constant"]
                for m in k8s.get("pvcMount", [])}
        outputs = self.provision_outputs(name, component)
        executor_input = {"inputs": {"parameterValues": values,
                                     "artifacts": {k: {"artifacts": v} for k, v in arts.items()}},
                          "outputs": outputs}
        fingerprint = fingerprint_of(executor_input, component, container, sorted(pvcs.values()))
        if task.get("cachingOptions", {}).get("enableCache") and fingerprint in self.b.cache:
            hit = self.b.cache[fingerprint]  # driver/cache.go reuseCachedOutputs
            return TaskRecord(name, CACHED, fingerprint, copy.deepcopy(hit.parameters), copy.deepcopy(hit.artifacts))
        record = self.launch(path, name, component, container, k8s, executor_input, pvcs)
        record.fingerprint = fingerprint
        if task.get("cachingOptions", {}).get("enableCache"):
            self.b.cache[fingerprint] = record
        return record

    def provision_outputs(self, name: str, component: dict[str, Any]) -> dict[str, Any]:
        """driver/driver.go provisionOutputs."""
        task_root = f"{self.root}/{self.b.pipeline_name}/{self.run_id}/{name}/{uuid.uuid4()}"
        out_defs = component.get("outputDefinitions", {})
        return {
            "artifacts": {a: {"artifacts": [{"name": a, "type": spec["artifactType"], "uri": f"{task_root}/{a}",
                                             "metadata": {}}]}
                          for a, spec in out_defs.get("artifacts", {}).items()},
            "parameters": {p: {"outputFile": f"{OUTPUT_PARAMETERS_DIR}/{p}"} for p in out_defs.get("parameters", {})},
            "outputFile": f"/s3/{task_root[len('s3://'):]}/output_metadata.json",
        }

    # -------------------------------------------------------------------------------------- launcher
    def launch(self, path: str, name: str, component: dict[str, Any], container: dict[str, Any],
               k8s: dict[str, Any], executor_input: dict[str, Any], pvcs: dict[str, str]) -> TaskRecord:
        """component/launcher_v2.go executeV2 in a fresh "pod" folder. A PVC (`pvcMount`) is a folder
        shared by every pod that mounts it; parameter values under its mount path point there."""
        pod = self.b.workdir / "pods" / f"{self.run_id[:8]}-{path.replace('/', '.')}"
        if pod.exists():
            shutil.rmtree(pod)
        (pod / "work").mkdir(parents=True)
        local = lambda p: pod / p.lstrip("/")  # noqa: E731 (a container path on this pod's filesystem)
        moved = copy.deepcopy(executor_input)  # what the task sees: container paths moved into the pod
        for p in moved["outputs"]["parameters"].values():
            p["outputFile"] = str(local(p["outputFile"]))
        moved["outputs"]["outputFile"] = str(local(moved["outputs"]["outputFile"]))
        for mount, pvc in pvcs.items():
            volume = self.b.workdir / "pvcs" / pvc
            volume.mkdir(parents=True, exist_ok=True)
            for pname, value in moved["inputs"]["parameterValues"].items():
                if isinstance(value, str) and (value == mount or value.startswith(mount.rstrip("/") + "/")):
                    moved["inputs"]["parameterValues"][pname] = str(volume) + value[len(mount.rstrip("/")):]
        for arts in moved["inputs"]["artifacts"].values():  # downloadArtifacts
            for a in arts["artifacts"]:
                self.b.download(a["uri"], local(_local_path(a["uri"])))
        for p in moved["outputs"]["parameters"].values():  # prepareOutputFolders
            Path(p["outputFile"]).parent.mkdir(parents=True, exist_ok=True)
        for arts in moved["outputs"]["artifacts"].values():
            for a in arts["artifacts"]:
                local(_local_path(a["uri"])).parent.mkdir(parents=True, exist_ok=True)
        with_defaults = copy.deepcopy(moved)  # addDefaultParams
        for pname, d in component.get("inputDefinitions", {}).get("parameters", {}).items():
            if pname not in with_defaults["inputs"]["parameterValues"] and "defaultValue" in d:
                with_defaults["inputs"]["parameterValues"][pname] = d["defaultValue"]
        cmd = [self.substitute(x, with_defaults, local) for x in container.get("command", []) + container.get("args", [])]
        env = self.environment(container, k8s, pod)
        log = pod / "log.txt"
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=pod / "work", env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=self.b.timeout, check=False)
        if proc.returncode != 0:
            tail = log.read_text()[-3000:]
            self.records[path] = TaskRecord(name, FAILED, log=log)
            raise HarnessError(f"task {name} failed (exit {proc.returncode}); its log ends:\n{tail}")
        out_file = Path(moved["outputs"]["outputFile"])
        executor_output = json.loads(out_file.read_text()) if out_file.is_file() else {}
        parameters = dict(executor_output.get("parameterValues", {}))
        for pname, p in moved["outputs"]["parameters"].items():  # collectOutputParameters
            if pname in parameters:
                continue
            try:
                text = Path(p["outputFile"]).read_text()
            except OSError as e:
                raise HarnessError(f"task {name}: output parameter {pname!r}: {e}") from None
            ptype = component["outputDefinitions"]["parameters"][pname]["parameterType"]
            parameters[pname] = _typed(text, ptype, pname)
        artifacts: dict[str, list[dict[str, Any]]] = {}
        for aname, arts in executor_input["outputs"]["artifacts"].items():  # uploadOutputArtifacts
            a = copy.deepcopy(arts["artifacts"][0])
            written = executor_output.get("artifacts", {}).get(aname, {}).get("artifacts", [])
            if written:  # mergeRuntimeArtifacts
                a["uri"] = written[0].get("uri") or a["uri"]
                a["metadata"] = {**a.get("metadata", {}), **(written[0].get("metadata") or {})}
            src = local(_local_path(a["uri"]))
            if src.exists():
                self.b.upload(src, a["uri"])
            a["name"] = self.b.new_artifact_id()  # the MLMD id RecordArtifact assigns
            artifacts[aname] = [a]
        return TaskRecord(name, COMPLETE, parameters=parameters, artifacts=artifacts, log=log)

    def substitute(self, arg: str, executor_input: dict[str, Any], local: Any) -> str:
        """launcher_v2.go compileCmdAndArgs and getPlaceholders."""
        arg = arg.replace("{{$}}", json.dumps(_protojson(executor_input)))
        ins, outs = executor_input["inputs"], executor_input["outputs"]
        for pname, value in ins["parameterValues"].items():
            text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) \
                else str(value).lower() if isinstance(value, bool) else _number(value)
            arg = arg.replace(f"{{{{$.inputs.parameters['{pname}']}}}}", text)
        for aname, arts in ins["artifacts"].items():
            a = arts["artifacts"][0]
            arg = arg.replace(f"{{{{$.inputs.artifacts['{aname}'].uri}}}}", a["uri"])
            arg = arg.replace(f"{{{{$.inputs.artifacts['{aname}'].path}}}}", str(local(_local_path(a["uri"]))))
        for aname, arts in outs["artifacts"].items():
            a = arts["artifacts"][0]
            arg = arg.replace(f"{{{{$.outputs.artifacts['{aname}'].uri}}}}", a["uri"])
            arg = arg.replace(f"{{{{$.outputs.artifacts['{aname}'].path}}}}", str(local(_local_path(a["uri"]))))
        for pname, p in outs["parameters"].items():
            arg = arg.replace(f"{{{{$.outputs.parameters['{pname}'].output_file}}}}", p["outputFile"])
        return arg

    def environment(self, container: dict[str, Any], k8s: dict[str, Any], pod: Path) -> dict[str, str]:
        """What the pod's process sees: a bare base, the container's env, secrets and field paths."""
        bin_dir = str(Path(self.b.python).parent)
        env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(pod / "home"), "LANG": "C.UTF-8",
               "TMPDIR": str(pod / "tmp"), "PYTHONPATH": str(self.b.site), "KFP_HARNESS_POD_ROOT": str(pod),
               "PYTHONUNBUFFERED": "1"}
        for var in ("E4SREC_CACHE",):  # the image's baked-in backbone cache stands in for the host's
            if var in os.environ:
                env[var] = os.environ[var]
        (pod / "home").mkdir(exist_ok=True)
        (pod / "tmp").mkdir(exist_ok=True)
        for e in container.get("env", []):
            env[e["name"]] = self.b.env_overrides.get(e["name"], str(e.get("value", "")))
        for s in k8s.get("secretAsEnv", []):
            secret = self.b.secrets.get(s["secretName"])
            if secret is None:
                if s.get("optional"):
                    continue
                raise HarnessError(f"secret {s['secretName']!r} does not exist (CreateContainerConfigError)")
            for kv in s["keyToEnv"]:
                env[kv["envVar"]] = secret[kv["secretKey"]]
        labels = {"pipeline/runid": self.run_id}  # apiserver/template/v2_template.go RunWorkflow
        for f in k8s.get("fieldPathAsEnv", []):
            m = re.fullmatch(r"metadata\.labels\['([^']+)'\]", f["fieldPath"])
            if m:
                env[f["name"]] = labels.get(m.group(1), "")
            elif f["fieldPath"] == "metadata.name":
                env[f["name"]] = pod.name
            else:
                raise HarnessError(f"fieldPath {f['fieldPath']!r} is not emulated by this harness")
        return env


# --------------------------------------------------------------------------------------------- utils
def fingerprint_of(executor_input: dict[str, Any], component: dict[str, Any], container: dict[str, Any],
                   pvc_names: list[str] | None = None) -> str:
    """driver/cache.go getFingerPrint + cacheutils/cache.go GenerateCacheKey and GenerateFingerPrint."""
    ins, outs = executor_input["inputs"], executor_input["outputs"]
    key = {
        "inputArtifactNames": {k: {"artifactNames": [a["name"] for a in v["artifacts"]]}
                               for k, v in ins.get("artifacts", {}).items()},
        "inputParameterValues": _protojson(ins.get("parameterValues", {})),  # 1 and 1.0 are one NumberValue
        "outputArtifactsSpec": {k: {"name": v["artifacts"][0]["name"], "type": v["artifacts"][0]["type"],
                                    "metadata": v["artifacts"][0].get("metadata", {})}
                                for k, v in outs.get("artifacts", {}).items() if v["artifacts"]},
        "outputParametersSpec": {k: component["outputDefinitions"]["parameters"][k]["parameterType"]
                                 for k in outs.get("parameters", {})},
        "containerSpec": {"image": container["image"],
                          "cmdArgs": list(container.get("command", [])) + list(container.get("args", [])),
                          "pvcNames": sorted(set(pvc_names or []))},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _produced(done: dict[str, TaskRecord], producer: str, kind: str, key: str, consumer: str | None = None) -> Any:
    """An upstream task's output parameter or artifact list (`kind`), when the task completed or was
    cached and produced it; else None, or with `consumer` (the input asking) a one-line error."""
    rec = done.get(producer)
    value = getattr(rec, kind).get(key) if rec is not None and rec.state in (COMPLETE, CACHED) else None
    if value is None and consumer is not None:
        raise HarnessError(f"{consumer}: task {producer!r} produced no {key!r}")
    return value


def _order(tasks: dict[str, Any]) -> list[str]:
    """Topological order over dependentTasks and data dependencies, ties by name (deterministic)."""
    deps = {}
    for name, t in tasks.items():
        d = set(t.get("dependentTasks", []))
        for spec in list(t.get("inputs", {}).get("parameters", {}).values()) + \
                list(t.get("inputs", {}).get("artifacts", {}).values()):
            for k in ("taskOutputParameter", "taskOutputArtifact"):
                if k in spec:
                    d.add(spec[k]["producerTask"])
        deps[name] = d & set(tasks)
    order: list[str] = []
    while len(order) < len(tasks):
        ready = sorted(n for n in tasks if n not in order and deps[n] <= set(order))
        if not ready:
            raise HarnessError(f"cycle among tasks {sorted(set(tasks) - set(order))}")
        order.append(ready[0])
    return order


def _typed(value: Any, ptype: str, name: str) -> Any:
    """metadata.TextToPbValue / the API server's parameter conversion, for one declared type."""
    try:
        if ptype == "STRING":
            return value if isinstance(value, str) else str(value)
        if ptype in ("NUMBER_INTEGER", "NUMBER_DOUBLE"):
            return float(value) if isinstance(value, str) else value
        if ptype == "BOOLEAN":
            return value if isinstance(value, bool) else {"true": True, "false": False}[str(value).strip().lower()]
        if ptype in ("LIST", "STRUCT"):
            return json.loads(value) if isinstance(value, str) else value
    except (ValueError, KeyError):
        pass
    raise HarnessError(f"parameter {name!r}: {value!r} is not a {ptype}")


def _number(value: Any) -> str:
    """strconv.FormatFloat(v, 'f', -1, 64): 3.0 -> '3', 0.5 -> '0.5'."""
    from decimal import Decimal

    f = float(value)
    return str(int(f)) if f.is_integer() else format(Decimal(repr(f)), "f")


def _protojson(value: Any) -> Any:
    """Numbers as protojson writes a structpb NumberValue: 42.0 -> 42 (what a task's json.loads sees)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    if isinstance(value, dict):
        return {k: _protojson(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_protojson(v) for v in value]
    return value


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key.strip("/")


def _local_path(uri: str) -> str:
    """component/launcher_v2.go LocalPathForURI."""
    if uri.startswith("s3://"):
        return "/s3/" + uri[len("s3://"):]
    raise HarnessError(f"{uri}: only s3:// URIs are emulated (LocalPathForURI knows gs://, minio://, s3://, oci://)")
