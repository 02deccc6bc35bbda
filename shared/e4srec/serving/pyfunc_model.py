"""MLflow models-from-code entry: this file is logged with the model and executed at load time.

Input (DataFrame records): `history` (list of original item ids, oldest first; strings or integers) and `k` (int).
Output, one row per request: `items` (top-k original ids, best first), `scores`, `unknown_items`
(ids the model does not know; they were dropped). A malformed or oversized request (more than
MAX_RECORDS users, a history over MAX_HISTORY items) is an MLflow BAD_REQUEST error, which the
scoring server answers with HTTP 400 and a one-line message. The same file serves E4SRec and SASRec.
"""

import numbers

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST

class RequestError(MlflowException):
    """A refused request: HTTP 400 whose message is the one-line reason.

    MLflow's scoring server rewrites the message of any MlflowException a model raises to
    "Failed to predict data '<the whole request as a table>'. Error: <reason>", several lines long
    for any request; this exception keeps the reason alone (the server still logs the request).
    """

    def __init__(self, reason: str) -> None:
        self._reason = reason
        super().__init__(reason, error_code=BAD_REQUEST)

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value: str) -> None:  # the server's rewrite; the reason stays
        pass


MAX_RECORDS = 1024  # users per request: a bigger batch belongs to batch-recommend
MAX_HISTORY = 10_000  # items per history: the model reads only its last max_len


class E4SRecPyfunc(mlflow.pyfunc.PythonModel):
    """Serves the model folder in the artifacts (E4SRec or SASRec); an E4SRec's backbone comes from the
    artifacts when it was logged, else from its recorded spec (checked against the recorded SHA-256)."""

    def load_context(self, context):  # noqa: ANN001, ANN201
        from e4srec import contracts, registry
        from e4srec.recommend import MicroBatcher, Recommender

        artifacts = context.artifacts
        if "backbone_reference" in artifacts:
            from e4srec.backbones import check_weights

            reference = contracts.read_json(artifacts["backbone_reference"])
            check_weights(reference["backbone"], reference["sha256"])
        folder, backbone = registry.logged_files(artifacts)
        self.recommender = Recommender(folder, backbone=backbone)
        self.batcher = MicroBatcher(self.recommender)  # the server calls predict from several threads at once

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
        from e4srec.errors import E4SRecError

        if not isinstance(model_input, pd.DataFrame) or "history" not in model_input.columns:
            raise RequestError("request needs a 'history' field: a list of item ids")
        if len(model_input) > MAX_RECORDS:
            raise RequestError(f"request has {len(model_input)} records; at most {MAX_RECORDS} per request: split it")
        histories = []
        for i, value in enumerate(model_input["history"].tolist()):
            if value is None or isinstance(value, str) or not hasattr(value, "__iter__"):
                raise RequestError(f"request {i}: 'history' must be a list of item ids, got {value!r:.80}")
            if len(value) > MAX_HISTORY:
                raise RequestError(f"request {i}: history of {len(value)} items; at most {MAX_HISTORY} (the model "
                                   f"reads the last {self.recommender.max_len})")
            bad = next((x for x in value if isinstance(x, bool) or not isinstance(x, (str, numbers.Integral))), None)
            if bad is not None:
                raise RequestError(f"request {i}: item ids are strings or integers, got {bad!r:.40} "
                                   f"({type(bad).__name__})")
            histories.append([str(x) for x in value])
        ks = model_input["k"].tolist() if "k" in model_input.columns else [10] * len(histories)
        try:
            ks = [int(k) for k in ks]
            results = self.batcher.recommend(histories, ks)
        except (E4SRecError, TypeError, ValueError) as e:
            raise RequestError(str(e).splitlines()[0]) from None
        return pd.DataFrame({"items": [r.items for r in results], "scores": [r.scores for r in results],
                             "unknown_items": [r.unknown_items for r in results]})


mlflow.models.set_model(E4SRecPyfunc())
