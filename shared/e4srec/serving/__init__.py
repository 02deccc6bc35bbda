"""MLflow packaging of a trained E4SRec model."""
