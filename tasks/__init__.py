"""Prefect tasks: one thin wrapper per stage around `mlpipe/`, adding MLflow logging and a Prefect artifact."""

from tasks.account import account
from tasks.anonymize import anonymize
from tasks.evaluate import evaluate
from tasks.ingest import ingest
from tasks.label import label
from tasks.refit import refit
from tasks.resample import resample
from tasks.run import pipeline_run
from tasks.search import search
from tasks.split import split
from tasks.train import train

__all__ = ["account", "anonymize", "evaluate", "ingest", "label", "pipeline_run", "refit", "resample", "search", "split", "train"]
