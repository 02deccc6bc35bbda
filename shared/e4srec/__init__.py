"""E4SRec as a Kubeflow pipeline: the package every stage and component imports."""
