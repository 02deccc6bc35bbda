"""The E4SRec pipeline factory (installed as `e4srec_pipelines`)."""

from e4srec_pipelines.pipeline import PIPELINE_NAME, compile_pipeline, create_pipeline

__all__ = ["PIPELINE_NAME", "compile_pipeline", "create_pipeline"]
