"""The contract between the train task and the torchrun worker: a JSON file in, JSON files out.

It names only training and validation data. The test split is not part of it, so no trial
can look at it.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from mlpipe.config import TrainConfig


class NewRun(BaseModel):
    """The MLflow child run rank 0 starts when the trial starts training (so the run's duration is
    the trial's own), or finds again when the trial resumes (a restart, a later halving rung)."""

    model_config = ConfigDict(extra="forbid")

    parent_run_id: str
    experiment_id: str
    params: dict[str, str]


class TrialSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    train: TrainConfig
    train_set: str  # npz: images, y, synthetic, class_weight (from resample)
    out_dir: str  # rank 0 writes checkpoint.pt and result.json here
    run_id: str | None = None  # MLflow child run that rank 0 logs metrics into
    new_run: NewRun | None = None  # no run_id: rank 0 starts (or finds) the trial's run with these
    val_set: str | None = None  # this trial's validation part (a cross-validation fold); None: the launch's
    metric_prefix: str = ""  # e.g. "fold2/": fold runs of one trial share its MLflow run
    stop_after: int | None = None  # successive halving: pause after this many epochs (resumable)


class WorkerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pixels: str  # the decode-once uint8 cache from ingest
    val_set: str | None  # npz: pixel_index, y. None (a refit on train+val): fixed epochs, the last weights kept
    num_classes: int
    tracking_uri: str | None = None
    trials: list[TrialSpec]


class TrialResult(BaseModel):
    name: str
    best_epoch: int
    epochs_run: int
    stopped_early: bool  # by early stopping (patience)
    paused: bool = False  # at a successive-halving budget, below train.epochs: can be continued
    val_metrics: dict[str, float]
    history: list[dict[str, float]]
    checkpoint: str
    world_size: int
    device: str
    amp: str
    train_items: int
    seconds: float
    run_id: str | None = None  # the MLflow run rank 0 logged into
    parent_run_id: str | None = None  # the pipeline run it belongs to (a trial folder is shared by runs)
    ended_ms: int | None = None  # when training ended, ms since the epoch: the run's end time


def is_done(result: TrialResult, stop_after: int | None, epochs: int) -> bool:
    """No more training needed: finished, stopped early, or paused at or past the budget."""
    return not result.paused or result.epochs_run >= min(stop_after or epochs, epochs)


def resolve_budget(cfg: TrainConfig, train_items: int, world_size: int = 1, epochs: int | None = None) -> TrainConfig:
    """The train section with every budget field concrete, as the worker needs it:

    - epochs: `epochs` if given (a refit), else train.epochs, else ceil(train.steps / steps per
      epoch) within [train.min_epochs, train.max_epochs], steps per epoch = ceil(ceil(train_items / world_size)
      / batch_size) (each rank's DistributedSampler shard, in batches);
    - patience auto: a quarter of the epochs, at least 5;
    - warmup_epochs auto: 5% of the epochs (at least one step is taken by the scheduler);
    - backbone_lr_scale auto: 0.1 with pretrained weights, else 1.
    """
    per_epoch = max(1, math.ceil(math.ceil(train_items / world_size) / cfg.batch_size))
    epochs = epochs or cfg.epochs or min(max(cfg.min_epochs, math.ceil(cfg.steps / per_epoch)), max(cfg.max_epochs, cfg.min_epochs))
    return cfg.model_copy(update={
        "epochs": epochs,
        "patience": max(5, -(-epochs // 4)) if cfg.patience == "auto" else cfg.patience,
        "warmup_epochs": round(0.05 * epochs, 4) if cfg.warmup_epochs == "auto" else cfg.warmup_epochs,
        "backbone_lr_scale": (0.1 if cfg.pretrained else 1.0) if cfg.backbone_lr_scale == "auto" else cfg.backbone_lr_scale,
    })  # fmt: skip
