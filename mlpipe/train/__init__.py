"""Training: `launch` (the stage, run by the train task) and `worker` (what torchrun runs).

Kept import-free so that `python -m mlpipe.train.worker` needs only torch, albumentations,
scikit-learn and pydantic: no Prefect, no MLflow, no imbalanced-learn.
"""
