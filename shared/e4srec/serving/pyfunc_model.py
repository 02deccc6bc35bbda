"""MLflow models-from-code entry: this file is logged with the model and executed at load time.

Input (DataFrame records): `history` (list of original item ids, oldest first) and `k` (int).
Output, one row per request: `items` (top-k original ids, best first), `scores`, `unknown_items`
(ids the model does not know; they were dropped). A malformed request is an MLflow BAD_REQUEST error,
which the scoring server answers with HTTP 400.
"""

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST


class E4SRecPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the E4SRec folder from the model's artifacts; the backbone comes from its recorded spec."""

    def load_context(self, context):  # noqa: ANN001, ANN201
        from e4srec.recommend import Recommender

        self.recommender = Recommender(context.artifacts["e4srec"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
        from e4srec.errors import E4SRecError

        if not isinstance(model_input, pd.DataFrame) or "history" not in model_input.columns:
            raise MlflowException("request needs a 'history' field: a list of item ids", error_code=BAD_REQUEST)
        histories = []
        for i, value in enumerate(model_input["history"].tolist()):
            if value is None or isinstance(value, str) or not hasattr(value, "__iter__"):
                raise MlflowException(f"request {i}: 'history' must be a list of item ids, got {value!r}",
                                      error_code=BAD_REQUEST)
            histories.append([str(x) for x in value])
        ks = model_input["k"].tolist() if "k" in model_input.columns else [10] * len(histories)
        try:
            ks = [int(k) for k in ks]
            results = self.recommender.recommend(histories, ks)
        except (E4SRecError, TypeError, ValueError) as e:
            raise MlflowException(str(e), error_code=BAD_REQUEST) from None
        return pd.DataFrame({"items": [r.items for r in results], "scores": [r.scores for r in results],
                             "unknown_items": [r.unknown_items for r in results]})


mlflow.models.set_model(E4SRecPyfunc())
