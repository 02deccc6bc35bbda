"""KFP component `report`: the run's HTML report (metrics side by side, curves, by-length, verdict)."""

# No `from __future__ import annotations`: KFP reads the real annotation objects.
from e4srec.images import CPU_IMAGE
from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Model, Output


def report(
    data: Input[Dataset],
    sasrec: Input[Model],
    e4srec: Input[Model],
    verdict: Input[Artifact],
    report: Output[Artifact],
    page: Output[HTML],
    tracking: bool = True,
    experiment: str = "e4srec",
    pipeline_run_name: str = "",
):
    """Write report.html with its PNGs (folder `report`) and the page alone (`page`, shown by the KFP UI)."""
    import shutil

    from e4srec.stages import report as stage

    stage.run_tracked(data.path, sasrec.path, e4srec.path, report.path, verdict_dir=verdict.path, tracking=tracking,
                      experiment=experiment, pipeline_run_name=pipeline_run_name,
                      title=f"E4SRec run report: {pipeline_run_name}" if pipeline_run_name else "")
    shutil.copyfile(f"{report.path}/{stage.PAGE}", page.path)


def build(image: str = CPU_IMAGE) -> dsl.python_component.PythonComponent:
    """The component running in `image` (which has e4srec and kfp installed)."""
    return dsl.component(report, base_image=image, install_kfp_package=False)
