"""Experiment tracking (MLflow) and the end-of-run report."""
