"""Published numbers for the datasets of the E4SRec paper, shown beside ours in the run report.

Only numbers this project's issues quote with their source; a dataset without an entry gets none.
Keys follow metrics.json (`test/full/...`: full ranking on the test split).
"""

from __future__ import annotations

PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "Beauty": {
        # E4SRec paper (Li et al. 2023), Table 3, LLaMA2-13B backbone.
        "E4SRec (paper, LLaMA2-13B)": {"test/full/HR@10": 0.0758, "test/full/NDCG@10": 0.0435},
        # SASRec as reported in the E4SRec paper's Table 3 (S3-Rec / CL4SRec numbers on the same files).
        "SASRec (paper)": {"test/full/HR@10": 0.0605, "test/full/NDCG@10": 0.0318},
        # S3-Rec (Zhou et al. 2020), sampled-99 protocol.
        "SASRec (S3-Rec, sampled)": {"test/sampled/HR@10": 0.4696},
    },
}


def for_dataset(input_name: str) -> dict[str, dict[str, float]]:
    """Published rows for a dataset file such as 'Beauty.txt' (empty when none are recorded)."""
    return PUBLISHED.get(input_name.rsplit(".", 1)[0].split("_")[0], {})
