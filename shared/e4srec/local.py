"""`e4srec run`: the whole pipeline on this machine through kfp.local, then where to look."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

from e4srec import contracts as c
from e4srec.errors import E4SRecError
from e4srec.tasklog import quiet_task_output


def _init_kfp_local(pipeline_root: Path | str) -> Path:
    """kfp.local with the SubprocessRunner in this environment, MLflow on one absolute URI; the root."""
    from kfp import local

    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # The project image's name has no "python" in it, which kfp.local takes as a sign of a
    # non-Python image; here the tasks run in this very environment, so the warning does not apply.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task", category=RuntimeWarning)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=False)
    return root


def run_local(input_path: Path | str, instructions: Path | str | None, pipeline_root: Path | str,
              params: dict[str, Any], verbose: bool = False) -> int:
    """Run `create_pipeline()` with kfp.local's SubprocessRunner in this Python environment.

    Every task runs as a subprocess of this interpreter (use_venv=False), so the installed e4srec is
    the one the components import. MLflow runs go to MLFLOW_TRACKING_URI, else to ./mlflow.db, made
    absolute here so that every task writes to the same file.
    """
    from e4srec_pipelines import create_pipeline
    from e4srec_pipelines.submit import RUN_RECORD

    from e4srec.evaluate import format_table
    from e4srec.settings import check_pipeline_arguments
    from e4srec.storage import is_s3

    check_pipeline_arguments(params)  # every setting checked before anything runs or any folder is made
    if not is_s3(input_path):  # s3:// URIs go to the tasks as they are
        input_path = Path(input_path).resolve()
        if not input_path.is_file():
            raise E4SRecError(f"{input_path}: input file not found; pass --input")
    instructions_uri = ""
    if instructions is not None and is_s3(instructions):
        instructions_uri = str(instructions)
    elif instructions is not None and Path(instructions).is_file():
        instructions_uri = str(Path(instructions).resolve())
    elif params.get("instruction_tune_backbone"):
        raise E4SRecError(f"{instructions}: instruction file not found; pass --instructions")
    root = _init_kfp_local(pipeline_root)
    # The tasks' MLflow parent run is keyed by the run id, which on Kubeflow comes from the pod's label
    # (see e4srec.tracking); kfp.local has no pods, and its subprocesses inherit this environment.
    os.environ["E4SREC_PIPELINE_RUN_ID"] = str(uuid.uuid4())
    before = set(root.iterdir())
    arguments = dict(input_uri=str(input_path), instructions_uri=instructions_uri, **params)
    try:
        with quiet_task_output(verbose) as task_output:
            task = create_pipeline("local")(**arguments)
    finally:  # the run's parameters beside its outputs, for `e4srec rerun` (also after a failure)
        for folder in sorted(set(root.iterdir()) - before)[-1:]:
            c.write_json(folder / RUN_RECORD, {"run_id": os.environ["E4SREC_PIPELINE_RUN_ID"], "parameters": arguments})
    outputs = task.outputs
    sasrec = Path(outputs["sasrec"].path) if "sasrec" in outputs else None
    e4srec = Path(outputs["e4srec"].path) if "e4srec" in outputs else None
    if sasrec is None or e4srec is None or not (e4srec / c.METRICS).is_file():
        why = f": {task_output.last_error}" if task_output.last_error else "; the failing task's log is above"
        raise E4SRecError(f"the pipeline failed{why} (task outputs under {root})")
    data = Path(outputs["data"].path)
    print()
    e4srec_metrics = c.read_json(e4srec / c.METRICS)
    print(format_table({"SASRec": c.read_json(sasrec / c.METRICS), "E4SRec": e4srec_metrics}))
    users = int(c.read_json(data / c.MANIFEST)["n_users"])
    if e4srec_metrics["eval/users"] < users:
        print(f"(E4SRec is evaluated on {int(e4srec_metrics['eval/users']):,} of {users:,} users, drawn with the seed; "
              f"trained on {int(e4srec_metrics['train/examples']):,} examples)")
    print()
    print(f"Pipeline outputs:  {sasrec.parent.parent}")
    print(f"  prepared data:   {data}")
    print(f"  SASRec model:    {sasrec}  (item_embeddings.safetensors, metrics.json, *.png)")
    print(f"  LLM backbone:    {outputs['backbone'].path}  (backbone.json; adapter/ when instruction-tuned)")
    print(f"  E4SRec model:    {e4srec}  (adapter/, head_proj.safetensors, metrics.json, *.png)")
    for page in sorted(sasrec.parent.parent.glob("report*/report/report.html")):
        print(f"  run report:      {page}")
    verdicts = sorted(sasrec.parent.parent.glob("deploy*/verdict/verdict.json"))
    verdict = c.read_json(verdicts[-1]) if verdicts else {}
    if "registered_model" in verdict:  # absent when tracking was off: nothing was registered
        from e4srec import registry, trained
        from e4srec.stages.deploy import summary

        name = verdict["registered_model"]
        first, gate = summary(verdict)
        print(f"Registry:          {first}")
        print(f"  {gate}")
        champion = registry.version_for(name, registry.CHAMPION)
        if champion is not None:
            kind = trained.LABELS.get((champion.tags or {}).get("kind", "e4srec"), "?")
            print(f"  champion:        version {champion.version} ({kind}); serve it with")
            print(f"    {registry.serve_command(name)}")
            data = c.load_sequence_data(outputs["data"].path)
            example = [str(data.item_ids[i]) for i in data.sequence(0)[-2:]]  # real ids: a user's last two items
            records = json.dumps({"dataframe_records": [{"history": example, "k": 5}]})
            print(f"    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d '{records}'")
            print(f"  or:              e4srec recommend --model models:/{name}@champion --history "
                  f"{' '.join(shlex.quote(i) for i in example)} --k 5")
    uri = os.environ["MLFLOW_TRACKING_URI"]
    beside = Path(sys.executable).parent / "mlflow"  # the venv's mlflow, when .venv is not activated
    mlflow_cmd = str(beside) if beside.exists() and not shutil.which("mlflow") else "mlflow"
    print(f"MLflow runs:       {uri}  (experiment {params.get('experiment', 'e4srec')!r})")
    print(f"  open the UI:     {mlflow_cmd} ui --backend-store-uri {uri}   (then http://127.0.0.1:5000)")
    return 0


def run_one_stage(pipeline: Any, pipeline_root: Path | str, verbose: bool = False) -> int:
    """Run a one-stage (rerun) pipeline through kfp.local and say where its outputs are."""
    root = _init_kfp_local(pipeline_root)
    before = set(root.iterdir())
    with quiet_task_output(verbose) as task_output:
        pipeline()
    new = sorted(set(root.iterdir()) - before)
    if not new or not any(new[-1].rglob("executor_output.json")) or task_output.last_error:
        why = f": {task_output.last_error}" if task_output.last_error else "; its log is above"
        raise E4SRecError(f"the rerun failed{why} (outputs under {root})")
    from e4srec.evaluate import format_table

    tables = {f.parent.parent.name: c.read_json(f) for f in sorted(new[-1].glob("*/*/" + c.METRICS))}
    ranked = {name: m for name, m in tables.items() if any(k.startswith("test/") for k in m)}
    if ranked:  # a model stage: the same table `e4srec run` ends with
        print()
        print(format_table(ranked))
    print(f"\nRerun outputs:     {new[-1]}")
    for item in sorted(p for p in new[-1].iterdir() if p.is_dir()):
        print(f"  {item.name}: {', '.join(sorted(x.name for x in item.iterdir()))}")
    if os.environ.get("E4SREC_RERUN_OF"):
        print(f"MLflow:            a pipeline run named {os.environ.get('E4SREC_PIPELINE_RUN_NAME', '')!r} in "
              f"{os.environ.get('MLFLOW_TRACKING_URI')}, tagged e4srec.rerun_of={os.environ['E4SREC_RERUN_OF']}")
    return 0
