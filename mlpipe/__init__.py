"""mlpipe: the pure library behind the pipeline. It never imports Prefect; only `tracking` imports MLflow."""

__version__ = "0.1.0"
