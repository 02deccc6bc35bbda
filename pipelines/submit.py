"""Thin entry points on the pipeline factory: submit to Kubeflow, and rerun one stage from earlier outputs."""

# No `from __future__ import annotations`: KFP reads the one-stage pipeline's real annotations.
import inspect
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from e4srec import contracts as c
from e4srec.errors import E4SRecError
from e4srec.settings import STAGES, check_pipeline_arguments, component_config
from e4srec_pipelines.pipeline import PIPELINE_NAME, configure_for, create_pipeline, stage_components
from e4srec_pipelines.profiles import load_profile
from kfp import compiler, dsl


def check_host(host: str) -> None:
    """A Kubeflow Pipelines endpoint is a URL: `127.0.0.1:9` is one line, not a connection error later."""
    from urllib.parse import urlparse

    parsed = urlparse(host)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise E4SRecError(f"--host {host!r}: not an http(s) URL; write it with its scheme, e.g. http://{host}"
                          if "://" not in host else f"--host {host!r}: not an http(s) URL, e.g. "
                          f"https://kubeflow.example.com/pipeline")


def client(host: str, namespace: str | None = None, token: str | None = None, cookie: str | None = None) -> Any:
    """A kfp.Client for `host` with a bearer token or a session cookie (an auth proxy's)."""
    import kfp

    return kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token, cookies=cookie)


# The oldest Kubeflow Pipelines backend this pipeline is known to run on: the compiled spec (kfp 2.17)
# uses dsl.OneOf over artifacts, field-path environment variables, empty-dir and PVC mounts and retry
# policies, and the conformance harness (tests/kfp_backend) follows the 2.17.0 backend's source.
MIN_KFP_BACKEND = (2, 17, 0)


def _version(text: str) -> tuple[int, ...] | None:
    import re

    m = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(x or 0) for x in m.groups()) if m else None


def check_api(host: str, token: str | None, cookie: str | None, timeout: float = 10.0) -> None:
    """One request to the API's healthz with the same credentials, so a refusal reads as one line
    (kfp.Client itself retries for a while and logs tracebacks); a backend older than
    MIN_KFP_BACKEND is refused (healthz answers its `tag_name`: backend/src/apiserver/main.go
    newHealthzResponse)."""
    import json
    import sys
    import urllib.error
    import urllib.request

    request = urllib.request.Request(host.rstrip("/") + "/apis/v2beta1/healthz")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if cookie:
        request.add_header("Cookie", cookie)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        hint = "; check --token or --cookie" if e.code in (401, 403) else ""
        raise E4SRecError(f"submitting to {host} failed (HTTP {e.code}){hint}") from None
    except (urllib.error.URLError, OSError) as e:
        raise E4SRecError(f"submitting to {host} failed: cannot reach it ({getattr(e, 'reason', e)})") from None
    try:
        tag = str(json.loads(body or b"{}").get("tag_name", ""))
    except ValueError:
        tag = ""
    found, needed = _version(tag), ".".join(map(str, MIN_KFP_BACKEND))
    if found is None:
        print(f"note: {host} does not say its Kubeflow Pipelines version (tag_name {tag!r}); this pipeline needs "
              f"{needed} or later", file=sys.stderr)
    elif found < MIN_KFP_BACKEND:
        raise E4SRecError(f"{host} runs Kubeflow Pipelines {tag}; this pipeline needs {needed} or later (dsl.OneOf "
                          f"over artifacts, field-path env, PVC and empty-dir mounts); upgrade the backend")


@dataclass
class Submitted:
    """What submit created: a run or a recurring run, and the pipeline version when uploaded."""

    kind: str  # "run" or "recurring run"
    id: str
    pipeline_root: str | None = None  # None: the kfp-launcher ConfigMap's default
    pipeline_id: str | None = None
    version_id: str | None = None
    version_name: str | None = None


def cron_6(expression: str) -> str:
    """KFP's cron has a seconds field (`0 0 3 * * *`); a 5-field crontab line gets second 0."""
    fields = expression.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise E4SRecError(f"--schedule {expression!r}: a cron expression has 5 fields (minute hour day month weekday) "
                          f"or KFP's 6 (with seconds first)")
    return " ".join(fields)


def _pipeline_id(kfp_client: Any, name: str, namespace: str | None) -> str | None:
    """The id of the pipeline called `name` in `namespace` (kfp's get_pipeline_id looks in the shared ones only)."""
    import json

    flt = json.dumps({"predicates": [{"key": "name", "operation": "EQUALS", "stringValue": name}]})
    found = kfp_client.list_pipelines(filter=flt, namespace=namespace, page_size=2).pipelines or []
    return found[0].pipeline_id if found else None


def submit_package(package: Path, arguments: dict[str, Any], *, host: str, namespace: str | None,
                   experiment: str, run_name: str | None, token: str | None, cookie: str | None,
                   pipeline_root: str | None = None, upload: str | None = None, schedule: str | None = None
                   ) -> Submitted:
    """Create a run of a compiled pipeline, or with `schedule` a recurring run; with `upload` the
    package first becomes a new version of the named pipeline (created when missing) and the run
    starts from that version, as in the KFP UI.

    The backend takes the pipeline root from the run's runtime config, else from its kfp-launcher
    ConfigMap; the spec's `defaultPipelineRoot` is never read (kubeflow/pipelines
    backend/src/v2/driver/root_dag.go RootDAG), so the root goes with the run.
    """
    import time
    import warnings

    from e4srec.images import VERSION

    cron = cron_6(schedule) if schedule else None
    root = pipeline_root or None
    warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline", category=FutureWarning)
    check_api(host, token, cookie)
    try:
        kfp_client = client(host, namespace, token, cookie)
        pipeline_id = version_id = version_name = None
        if upload:
            version_name = f"{VERSION}-{time.strftime('%Y%m%d-%H%M%S')}"
            pipeline_id = _pipeline_id(kfp_client, upload, namespace)
            if pipeline_id is None:  # the upload creates the pipeline and its first version
                pipeline_id = kfp_client.upload_pipeline(str(package), pipeline_name=upload, namespace=namespace,
                                                         description=f"E4SRec {VERSION}").pipeline_id
                versions = kfp_client.list_pipeline_versions(pipeline_id, sort_by="created_at desc", page_size=1)
                version_id = versions.pipeline_versions[0].pipeline_version_id
                version_name = versions.pipeline_versions[0].display_name
            else:
                version_id = kfp_client.upload_pipeline_version(str(package), version_name,
                                                                pipeline_id=pipeline_id).pipeline_version_id
        source = (dict(pipeline_id=pipeline_id, version_id=version_id) if upload
                  else dict(pipeline_package_path=str(package)))
        if cron:
            experiment_id = kfp_client.create_experiment(experiment, namespace=namespace).experiment_id
            made = kfp_client.create_recurring_run(
                experiment_id, run_name or f"{upload or PIPELINE_NAME} {cron}", cron_expression=cron, params=arguments,
                pipeline_root=root, max_concurrency=1, no_catchup=True,
                enable_caching=False,  # the same input URI each time: the data behind it is what changes
                **source)
            return Submitted("recurring run", made.recurring_run_id, root, pipeline_id, version_id, version_name)
        if upload:
            experiment_id = kfp_client.create_experiment(experiment, namespace=namespace).experiment_id
            made = kfp_client.run_pipeline(experiment_id, run_name or f"{upload} {version_name}", params=arguments,
                                           pipeline_root=root, **source)
            return Submitted("run", made.run_id, root, pipeline_id, version_id, version_name)
        made = kfp_client.create_run_from_pipeline_package(
            str(package), arguments=arguments, run_name=run_name, experiment_name=experiment, namespace=namespace,
            pipeline_root=root)
        return Submitted("run", made.run_id, root)
    except E4SRecError:
        raise
    except Exception as e:  # noqa: BLE001 (kfp_server_api ApiException, urllib3 errors, kfp's healthz TimeoutError)
        status = getattr(e, "status", "")
        raise E4SRecError(f"submitting to {host} failed{f' (HTTP {status})' if status else ''}: "
                          f"{str(getattr(e, 'reason', '') or e).splitlines()[0][:300]}") from None


def submit(arguments: dict[str, Any], *, host: str, profile: str = "cluster", pipeline: Any = None,
           namespace: str | None = None, experiment: str = "e4srec", run_name: str | None = None,
           token: str | None = None, cookie: str | None = None, pipeline_root: str | None = None,
           upload: str | None = None, schedule: str | None = None) -> Submitted:
    """Compile `pipeline` (default: the whole pipeline for `profile`) and create a run of it on the
    Kubeflow Pipelines API at `host`, under `pipeline_root` (default: the profile's)."""
    check_host(host)
    if pipeline is None:
        check_pipeline_arguments(arguments)
    loaded = load_profile(profile)
    if pipeline_root is None:
        pipeline_root = loaded.pipeline_root
    if schedule and pipeline is None:
        # Every scheduled run reads the same input URI: a cache keyed on inputs would answer each stage with
        # the first run's results however the data behind it changed. kfp.Client's enable_caching=False
        # reaches only the root DAG's tasks (client.py _override_caching_options), so compile it off.
        loaded.caching = {"default": False}
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(pipeline or create_pipeline(loaded), str(package))
        return submit_package(package, arguments, host=host, namespace=namespace, experiment=experiment,
                              run_name=run_name, token=token, cookie=cookie, pipeline_root=pipeline_root,
                              upload=upload, schedule=schedule)


# What each stage reads from an earlier run: component input -> (task name glob, output name, kind).
RERUN_INPUTS: dict[str, dict[str, tuple[str, str, type]]] = {
    "pretrain-sasrec": {"data": ("prepare-data", "data", dsl.Dataset)},
    "instruction-tune": {},
    "train-e4srec": {"data": ("prepare-data", "data", dsl.Dataset), "sasrec": ("pretrain-sasrec", "model", dsl.Model),
                     "backbone": ("instruction-tune*", "backbone", dsl.Model)},
    "deploy": {"model": ("train-e4srec", "model", dsl.Model), "sasrec": ("pretrain-sasrec", "model", dsl.Model),
               "data": ("prepare-data", "data", dsl.Dataset)},
    "batch-recommend": {"model": ("train-e4srec", "model", dsl.Model), "data": ("prepare-data", "data", dsl.Dataset)},
    "report": {"data": ("prepare-data", "data", dsl.Dataset), "sasrec": ("pretrain-sasrec", "model", dsl.Model),
               "e4srec": ("train-e4srec", "model", dsl.Model), "verdict": ("deploy", "verdict", dsl.Artifact)},
}
RUN_RECORD = "pipeline_run.json"  # `e4srec run` leaves it in its run folder: run id and parameters
CHANNEL = "pipelinechannel--"  # how the compiler names a pipeline parameter inside a sub-DAG


@dataclass
class EarlierRun:
    """An earlier run: where its outputs are, and the pipeline parameters it ran with."""

    name: str
    parameters: dict[str, Any]
    spec: dict[str, Any]  # its compiled pipeline spec (what maps pipeline parameters to stage parameters)
    recorded: bool = True  # False: a local run folder without pipeline_run.json (the pipeline's defaults apply)
    folder: Path | None = None  # a local run
    api_run: dict[str, Any] | None = None  # a cluster run, as the KFP API's GET /apis/v2beta1/runs/{id} returns it
    run_id: str = ""  # the pipeline run id its MLflow parent run is tagged with

    def locate(self, task_glob: str, output: str) -> str:
        """The URI of a task's output in this run."""
        if self.folder is not None:
            matches = sorted(p for p in self.folder.glob(f"{task_glob}/{output}") if p.exists())
            if not matches:
                raise E4SRecError(f"{self.folder}: no {task_glob}/{output} here; point --from at a run folder "
                                  f"(runs/e4srec-...) whose {task_glob.rstrip('*')} task finished")
            return str(matches[-1].resolve())
        return _locate_in_cluster_run(self.api_run or {}, self.spec, task_glob, output)

    def stage_parameters(self, stage: str, component: Any) -> dict[str, Any]:
        """The parameters the run gave the stage's task, read from its spec: each task input that is a
        pipeline parameter takes the run's value (or the pipeline's default)."""
        accepted = {n: p for n, p in inspect.signature(component.python_func).parameters.items()
                    if n not in ("tune", "skip")}  # a rerun of instruction-tune tunes unless --set says otherwise
        defaults = {k: v.get("defaultValue") for k, v in
                    self.spec["root"].get("inputDefinitions", {}).get("parameters", {}).items()}
        out: dict[str, Any] = {}
        for task in _tasks(self.spec):
            if task.get("taskInfo", {}).get("name") != stage:  # the display name; "instruction-tune (skipped)" is not it
                continue
            for name, src in task.get("inputs", {}).get("parameters", {}).items():
                pipeline_param = src.get("componentInputParameter", "").removeprefix(CHANNEL)
                value = self.parameters.get(pipeline_param, defaults.get(pipeline_param))
                if name in accepted and pipeline_param and value is not None:
                    out[name] = _as(accepted[name].annotation, value)
        return out


def _as(kind: Any, value: Any) -> Any:
    """A value as a component parameter of type `kind` takes it; a bool from text is 1/true/yes."""
    if kind is bool and isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return kind(value) if kind in (int, float, str, bool) else value


def _tasks(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every task of the spec, the root DAG's and its sub-DAGs'."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec.get("components", {}).values() if "dag" in c]
    return [t for d in dags for t in d.get("tasks", {}).values()]


def _locate_in_cluster_run(run: dict[str, Any], spec: dict[str, Any], task_glob: str, output: str) -> str:
    """An output of a run on Kubeflow. The API's run details name its tasks and their states but hold
    no artifact URIs (only MLMD ids), so the URI comes from the backend's layout,
    `<root>/<pipeline name>/<run id>/<task>/<uuid>/<output>` (kubeflow/pipelines backend/src/v2/driver
    driver.go provisionOutputs), listed in the object store."""
    import fnmatch

    from e4srec import storage

    root = (run.get("runtime_config") or {}).get("pipeline_root") or ""
    run_id = run.get("run_id", "")
    if not root.startswith("s3://"):
        raise E4SRecError(f"run {run_id}: its pipeline root {root or '(the kfp-launcher default)'} is not s3://; "
                          f"pass the inputs with --input-override NAME=s3://...")
    tasks = (run.get("run_details") or {}).get("task_details") or []
    # v2beta1 RuntimeState has no CACHED: a cache hit reads SKIPPED (backend/api/v2beta1/run.proto)
    skipped = [t["display_name"] for t in tasks if t.get("state") in ("SKIPPED", "CACHED")
               and fnmatch.fnmatch(t.get("display_name", ""), task_glob)]
    prefix = f"{root.rstrip('/')}/{spec['pipelineInfo']['name']}/{run_id}/"
    bucket, key = storage.split(prefix)
    found: dict[str, Any] = {}  # output URI -> its newest object's time (a retried task has several)
    for page in storage.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/"):
        for obj in page.get("Contents", []):
            parts = obj["Key"][len(key) + 1:].split("/")
            if len(parts) >= 3 and parts[2] == output and fnmatch.fnmatch(parts[0], task_glob):
                uri = f"s3://{bucket}/{key}/{'/'.join(parts[:3])}"
                found[uri] = max(found.get(uri, obj["LastModified"]), obj["LastModified"])
    if not found:
        if skipped:
            raise E4SRecError(f"run {run_id}: task {skipped[0]} was skipped (a cache hit, its {output} then belonging "
                              f"to the run that computed it); rerun --from that run, or pass --input-override")
        raise E4SRecError(f"run {run_id}: no {task_glob.rstrip('*')} {output} under {prefix}; did that task finish?")
    return max(found, key=found.get)


def earlier_run(run: str, *, host: str | None = None, token: str | None = None, cookie: str | None = None,
                namespace: str | None = None) -> EarlierRun:
    """A local run folder (runs/e4srec-...), or with `host` a Kubeflow run id."""
    if host:
        check_api(host, token, cookie)
        kfp_client = client(host, namespace, token, cookie)
        try:
            api_run = kfp_client.get_run(run).to_dict()
        except Exception as e:  # noqa: BLE001 (kfp_server_api ApiException)
            raise E4SRecError(f"run {run}: not found at {host} ({getattr(e, 'status', '') or e}); --from takes a "
                              f"run id with --host") from None
        spec = api_run.get("pipeline_spec") or {}
        if not spec:  # a run of an uploaded pipeline version: that version's spec
            ref = api_run.get("pipeline_version_reference") or {}
            try:
                spec = kfp_client.get_pipeline_version(ref.get("pipeline_id"),
                                                       ref.get("pipeline_version_id")).to_dict().get("pipeline_spec")
            except Exception as e:  # noqa: BLE001 (kfp_server_api ApiException)
                raise E4SRecError(f"run {run}: cannot read its pipeline version {ref} ({e}); pass the inputs with "
                                  f"--input-override") from None
        spec = (spec or {}).get("pipeline_spec", spec)  # with a platform spec, the pipeline spec is one level down
        params = (api_run.get("runtime_config") or {}).get("parameters") or {}
        return EarlierRun(run, params, spec, api_run=api_run, run_id=run)
    folder = Path(run)
    if not folder.is_dir():
        raise E4SRecError(f"{run}: no such run folder; pass a local run (runs/e4srec-...) or, with --host, a "
                          f"Kubeflow run id")
    record = folder / RUN_RECORD
    saved = (c.read_json_object(record, c.RUN_RECORD_FIELDS, "it is written by `e4srec run`; restore it, or delete it "
                                "to rerun with the pipeline's defaults") if record.is_file() else {})
    return EarlierRun(folder.name, saved.get("parameters", {}), _compiled_spec("local"), recorded=record.is_file(),
                      folder=folder, run_id=saved.get("run_id", ""))


def _compiled_spec(profile: str) -> dict[str, Any]:
    """The pipeline spec (the YAML's first document; a platform spec may follow) for a profile."""
    with tempfile.TemporaryDirectory() as tmp:
        compiler.Compiler().compile(create_pipeline(profile), f"{tmp}/p.yaml")
        return next(yaml.safe_load_all(Path(f"{tmp}/p.yaml").read_text()))


def convert(component: Any, settings: list[str]) -> dict[str, Any]:
    """`key=value` strings typed by the component's signature; unknown keys list the known ones."""
    params = inspect.signature(component.python_func).parameters
    out: dict[str, Any] = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in params:
            known = ", ".join(n for n, p in params.items() if p.annotation in (str, int, float, bool))
            raise E4SRecError(f"--set {item!r}: expected KEY=VALUE with KEY one of {known}")
        kind = params[key].annotation
        try:
            out[key] = _as(kind, value)
        except ValueError:
            raise E4SRecError(f"--set {item!r}: {value!r} is not a valid {kind.__name__}") from None
    return out


def check_stage_parameters(stage: str, params: dict[str, Any]) -> None:
    """Build the stage's config from the parameters a rerun would pass its component, so that a bad `--set`
    value is one line here rather than a failed task (the component builds the same config from them)."""
    if stage in STAGES:  # report: no settings beyond its inputs
        component_config(stage, params)


def rerun_pipeline(stage: str, run: EarlierRun, settings: list[str], profile: str = "local",
                   overrides: dict[str, str] | None = None, report: Any = print) -> Any:
    """A one-stage pipeline whose inputs come from an earlier run's outputs through dsl.importer, with
    the parameters that run gave the stage unless `settings` (KEY=VALUE) override them."""
    if stage not in RERUN_INPUTS:
        raise E4SRecError(f"stage {stage!r}: can be rerun: {', '.join(RERUN_INPUTS)}")
    unknown = sorted(set(overrides or {}) - set(RERUN_INPUTS[stage]))
    if unknown:
        raise E4SRecError(f"--input-override {unknown[0]}=...: {stage} has no input {unknown[0]!r}; its inputs: "
                          f"{', '.join(RERUN_INPUTS[stage])}")
    loaded = load_profile(profile)
    component, configure = stage_components(loaded)[stage], configure_for(loaded)
    inherited, chosen = run.stage_parameters(stage, component), convert(component, settings)
    params = {**inherited, **chosen}
    check_stage_parameters(stage, params)
    sources = {name: (overrides or {}).get(name) or run.locate(glob, output)
               for name, (glob, output, _) in RERUN_INPUTS[stage].items()}
    shown = ", ".join(f"{k}={v}" for k, v in sorted(inherited.items()) if k not in chosen) or "none"
    said = (f"the parameters run {run.name} gave it" if run.recorded else
            f"the pipeline's defaults ({run.name} has no {RUN_RECORD}: it predates them)")
    report(f"rerun {stage} with {said}: {shown}"
           + (f"; set here: {', '.join(f'{k}={v}' for k, v in sorted(chosen.items()))}" if chosen else ""))

    @dsl.pipeline(name=f"{PIPELINE_NAME}-rerun-{stage}", pipeline_root=loaded.pipeline_root or None)
    def one_stage():
        inputs = {}
        for name, (_, _, kind) in RERUN_INPUTS[stage].items():
            inputs[name] = dsl.importer(artifact_uri=sources[name], artifact_class=kind, reimport=False).output
        task = configure(component(**inputs, **params), stage)
        if stage == "deploy":  # as in the pipeline: the champion moves when the gate approves
            with dsl.If(task.outputs["Output"] == True):  # noqa: E712 (a KFP condition, not a Python test)
                configure(stage_components(loaded)["promote-champion"](verdict=task.outputs["verdict"]),
                          "promote-champion")

    return one_stage
