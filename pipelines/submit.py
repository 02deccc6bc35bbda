"""Thin entry points on the pipeline factory: submit to Kubeflow, and rerun one stage from earlier outputs."""

# No `from __future__ import annotations`: KFP reads the one-stage pipeline's real annotations.
import inspect
import tempfile
from pathlib import Path
from typing import Any

from e4srec.errors import E4SRecError
from e4srec.storage import is_s3
from e4srec_pipelines.pipeline import PIPELINE_NAME, configure_for, create_pipeline, stage_components
from e4srec_pipelines.profiles import load_profile
from kfp import compiler, dsl


def client(host: str, namespace: str | None = None, token: str | None = None, cookie: str | None = None) -> Any:
    """A kfp.Client for `host` with a bearer token or a session cookie (an auth proxy's)."""
    import kfp

    return kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token, cookies=cookie)


def check_api(host: str, token: str | None, cookie: str | None, timeout: float = 10.0) -> None:
    """One request to the API's healthz with the same credentials, so a refusal reads as one line
    (kfp.Client itself retries for a while and logs tracebacks)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(host.rstrip("/") + "/apis/v2beta1/healthz")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if cookie:
        request.add_header("Cookie", cookie)
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as e:
        hint = "; check --token or --cookie" if e.code in (401, 403) else ""
        raise E4SRecError(f"submitting to {host} failed (HTTP {e.code}){hint}") from None
    except (urllib.error.URLError, OSError) as e:
        raise E4SRecError(f"submitting to {host} failed: cannot reach it ({getattr(e, 'reason', e)})") from None


def submit_package(package: Path, arguments: dict[str, Any], *, host: str, namespace: str | None,
                   experiment: str, run_name: str | None, token: str | None, cookie: str | None) -> Any:
    """Create a run of a compiled pipeline; returns kfp's RunPipelineResult (`.run_id`)."""
    import warnings

    warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline", category=FutureWarning)
    check_api(host, token, cookie)
    try:
        kfp_client = client(host, namespace, token, cookie)
        return kfp_client.create_run_from_pipeline_package(
            str(package), arguments=arguments, run_name=run_name, experiment_name=experiment, namespace=namespace)
    except Exception as e:  # noqa: BLE001 (kfp_server_api ApiException, urllib3 errors, kfp's healthz TimeoutError)
        status = getattr(e, "status", "")
        raise E4SRecError(f"submitting to {host} failed{f' (HTTP {status})' if status else ''}: "
                          f"{str(getattr(e, 'reason', '') or e).splitlines()[0][:300]}") from None


def submit(arguments: dict[str, Any], *, host: str, profile: str = "cluster", pipeline: Any = None,
           namespace: str | None = None, experiment: str = "e4srec", run_name: str | None = None,
           token: str | None = None, cookie: str | None = None) -> Any:
    """Compile `pipeline` (default: the whole pipeline for `profile`) and create a run of it on the
    Kubeflow Pipelines API at `host`."""
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(pipeline or create_pipeline(profile), str(package))
        return submit_package(package, arguments, host=host, namespace=namespace, experiment=experiment,
                              run_name=run_name, token=token, cookie=cookie)


# What each stage reads from an earlier run: component input -> (task folder glob, output name, kind).
RERUN_INPUTS: dict[str, dict[str, tuple[str, str, type]]] = {
    "pretrain-sasrec": {"data": ("prepare-data", "data", dsl.Dataset)},
    "instruction-tune": {},
    "train-e4srec": {"data": ("prepare-data", "data", dsl.Dataset), "sasrec": ("pretrain-sasrec", "model", dsl.Model),
                     "llm_uri": ("instruction-tune*", "backbone", str)},
    "deploy": {"model": ("train-e4srec", "model", dsl.Model), "data": ("prepare-data", "data", dsl.Dataset)},
    "batch-recommend": {"model": ("train-e4srec", "model", dsl.Model), "data": ("prepare-data", "data", dsl.Dataset)},
    "report": {"data": ("prepare-data", "data", dsl.Dataset), "sasrec": ("pretrain-sasrec", "model", dsl.Model),
               "e4srec": ("train-e4srec", "model", dsl.Model), "verdict": ("deploy", "verdict", dsl.Artifact)},
}


def _locate(run: str, task_glob: str, output: str) -> str:
    if is_s3(run):  # a cluster run's root: the same <task>/<output> layout is expected under it
        return f"{run.rstrip('/')}/{task_glob.rstrip('*')}/{output}"
    matches = sorted(p for p in Path(run).glob(f"{task_glob}/{output}") if p.exists())
    if not matches:
        raise E4SRecError(f"{run}: no {task_glob}/{output} here; point --from at a run folder (runs/e4srec-...)")
    return str(matches[-1].resolve())


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
            out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        except ValueError:
            raise E4SRecError(f"--set {item!r}: {value!r} is not a valid {kind.__name__}") from None
    return out


def rerun_pipeline(stage: str, run: str, settings: list[str], profile: str = "local",
                   overrides: dict[str, str] | None = None) -> Any:
    """A one-stage pipeline whose inputs come from an earlier run's outputs through dsl.importer."""
    if stage not in RERUN_INPUTS:
        raise E4SRecError(f"stage {stage!r}: can be rerun: {', '.join(RERUN_INPUTS)}")
    loaded = load_profile(profile)
    component, configure = stage_components(loaded)[stage], configure_for(loaded)
    params = convert(component, settings)
    sources = {name: (overrides or {}).get(name) or _locate(run, glob, output)
               for name, (glob, output, _) in RERUN_INPUTS[stage].items()}

    @dsl.pipeline(name=f"{PIPELINE_NAME}-rerun-{stage}", pipeline_root=loaded.pipeline_root or None)
    def one_stage():
        inputs = {}
        for name, (_, _, kind) in RERUN_INPUTS[stage].items():
            if kind is str:  # passed on as a URI, as the full pipeline's dsl.OneOf does
                inputs[name] = sources[name]
            else:
                inputs[name] = dsl.importer(artifact_uri=sources[name], artifact_class=kind, reimport=False).output
        configure(component(**inputs, **params), stage)

    return one_stage
