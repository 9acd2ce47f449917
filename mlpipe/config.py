"""`PipelineConfig`: the flow's only parameter, the Prefect UI form, and what YAML files validate against.

One nested model per stage; every stage function receives only its own section. Unknown keys
are errors everywhere (`extra="forbid"`), and every validation problem becomes one line that
names the dotted key.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sklearn.model_selection import ParameterGrid

from mlpipe.errors import MlpipeError


def _at_least_one_or_auto(value: int | str) -> int | str:
    if isinstance(value, int) and value < 1:
        raise ValueError("must be at least 1 or 'auto'")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # NaN and inf: refused


SAMPLE_URI = "sample://digits"
IMAGEFOLDER_LABEL = "class"  # the column an imagefolder listing puts the class folder's name in


class SourceConfig(_Section):
    uri: str = Field(
        SAMPLE_URI, description="Dataset root: a directory or any fsspec URL (file://, s3://, ...), or sample://digits."
    )
    layout: Literal["auto", "manifest", "imagefolder", "dicom"] = Field(
        "auto",
        description="manifest: a table of image paths; imagefolder: root/CLASS/IMAGE, one folder per class (column 'class'); "
        "dicom: every DICOM file under the root, the manifest built from their headers (label.columns names a header "
        "attribute, or 'class' for the top folder). DICOM files (.dcm, or the DICM preamble) anywhere get their header "
        "attributes as columns. auto: manifest when the root holds source.manifest (sample://digits does), else "
        "imagefolder when a subfolder holds images or DICOM files, else dicom when the root holds DICOM files; "
        "resolved once before the run and recorded resolved.",
    )
    manifest: str = Field("manifest.csv", description="Manifest file (.csv, .parquet or .jsonl), relative to the root.")
    image_column: str = Field("image", description="Manifest column with image paths relative to the root.")


# ingest.image_size auto: the median longer side of the sampled images, clamped to this range (pixels).
AUTO_SIZE_RANGE = (16, 128)
AUTO_SAMPLE_IMAGES = 32  # images an auto value is detected from: evenly spaced over the rows, the same each time


class DicomConfig(_Section):
    window: Literal["header", "minmax"] | list[float] = Field(
        "header",
        description="DICOM grey levels to 8 bits, after Rescale Slope/Intercept: header (the file's VOI LUT, else its "
        "first Window Center/Width, else the image's own range), minmax (the image's own range), or [center, width] "
        "in rescaled units (Hounsfield units for CT; e.g. [40, 400] soft tissue, [-600, 1500] lung).",
    )
    frames: Literal["first", "middle", "all"] = Field(
        "middle",
        description="Multi-frame files (cine loops, enhanced CT/MR): the first frame, the middle one (the first of a "
        "loop is often blank), or every frame as its own item, the frames of a file kept in one split.",
    )

    @field_validator("window")
    @classmethod
    def _center_and_width(cls, value):
        if isinstance(value, list) and (len(value) != 2 or value[1] < 1):
            raise ValueError(f"a window is [center, width] with width at least 1 (got {value})")
        return value


class IngestConfig(_Section):
    image_size: int | Literal["auto"] = Field(
        "auto",
        description="Side of the square training resolution in pixels (4-1024). auto: the median longer side "
        f"(max of width, height) of {AUTO_SAMPLE_IMAGES} images spread evenly over the rows, clamped to "
        f"{AUTO_SIZE_RANGE[0]}-{AUTO_SIZE_RANGE[1]}, then raised to the smallest size train.model (and every "
        "grid model) runs at; sample://digits (8x8 scans) gets 16. Resolved once before the run and recorded.",
    )
    channels: Literal["auto", 1, 3] = Field(
        "auto",
        description="1 for grayscale, 3 for RGB. auto: 3 when any sampled image (as for image_size) has colour "
        "(R, G and B differ by more than 8 of 255 levels at 1% of its pixels or more), else 1; resolved once "
        "before the run and recorded.",
    )
    max_pixels: int = Field(
        40_000_000, ge=1,
        description="The only pixel limit: an image whose header says width x height is above this is quarantined "
        "('over the pixel limit') before decoding (decompression bombs). Pillow's own limit (about 89.5 Mpx) is off, "
        "so raising this admits larger scans; decoding one takes about width x height x bands bytes of memory.",
    )  # fmt: skip
    background: Literal["auto", "white", "black"] = Field(
        "auto",
        description="What transparent pixels (alpha, palette transparency, PNG colour keys) are composited over. "
        "auto: white when the visible pixels are dark on average (alpha-weighted mean luminance below 128 of 255), "
        "else black, so black strokes on a transparent canvas stay visible; white or black: always that colour.",
    )
    min_rows: int = Field(1, ge=1, description="Fewer surviving rows than this stop the run.")
    near_duplicate_distance: int | None = Field(
        2, ge=0, le=15, description="Max perceptual-hash distance of near-duplicates (kept together by split); null: off."
    )
    workers: int | Literal["auto"] = Field("auto", description="Decoding processes (threads for remote sources); auto: cores, at most 8.")
    max_drop_fraction: float = Field(
        0.2, ge=0, le=1, description="Quarantined rows and exact duplicates: past this share of the rows, ingest stops."
    )
    dicom: DicomConfig = Field(default_factory=DicomConfig, description="How DICOM pixels become images.")

    _workers_positive = field_validator("workers")(_at_least_one_or_auto)

    @field_validator("image_size")
    @classmethod
    def _size_in_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 4 <= value <= 1024:
            raise ValueError(f"must be 'auto' or from 4 to 1024 pixels (got {value})")
        return value


Action = Literal["keep", "drop", "pseudonymize", "generalize_date", "generalize_number", "truncate", "redact_text",
                 "remap_uid", "shift_date"]  # fmt: skip


class ColumnPolicy(_Section):
    action: Action = Field(
        description="What happens to this column's values. remap_uid: a DICOM UID to a keyed HMAC UID under 2.25; "
        "shift_date: DICOM dates moved by a keyed per-patient offset (intervals kept)."
    )
    granularity: Literal["year", "month"] = Field("year", description="For generalize_date only.")
    bins: list[float] | None = Field(None, description="For generalize_number: ascending bin edges, e.g. [0, 18, 40, 65, 120].")
    keep_chars: int | None = Field(None, ge=1, description="For truncate: characters kept, e.g. 3 for a zip prefix.")
    quasi_identifier: bool = Field(False, description="Counts towards k-anonymity (after generalization).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `name: drop` in YAML is the common case; the long form carries options.
        return {"action": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _options_match_action(self) -> ColumnPolicy:
        if self.action == "generalize_number" and (
            not self.bins or len(self.bins) < 2 or any(b >= a for a, b in zip(self.bins[1:], self.bins, strict=False))
        ):
            raise ValueError("generalize_number needs bins: at least two ascending edges")
        if self.action == "truncate" and self.keep_chars is None:
            raise ValueError("truncate needs keep_chars")
        return self


# The personal columns of mlpipe's generated manifests (the sample and mlpipe.datasets) and what happens to them.
PERSONAL_DATA_POLICY: dict[str, Any] = {
    "subject_id": "pseudonymize",
    "name": "drop",
    "email": "drop",
    "phone": "drop",
    "date_of_birth": {"action": "generalize_date", "granularity": "year"},
    "note": "redact_text",
}


SAMPLE_LABEL_COLUMNS = ["annotator_1", "annotator_2", "annotator_3"]
SAMPLE_GROUP_COLUMN = "subject_id"


def _sample_policy() -> dict[str, ColumnPolicy]:
    policy = {**PERSONAL_DATA_POLICY, **dict.fromkeys(SAMPLE_LABEL_COLUMNS, "keep")}
    return {column: ColumnPolicy.model_validate(p) for column, p in policy.items()}


class AnonymizeConfig(_Section):
    policy: dict[str, ColumnPolicy] = Field(
        default_factory=_sample_policy,
        description="One policy per manifest column (the image column is handled by anonymize itself). "
        "A column without a policy stops the run. The default is the sample's; with the imagefolder layout it "
        "becomes {} (the listing has no other columns) and the class column is kept without a policy.",
    )
    key_env: str = Field(
        "MLPIPE_PSEUDONYM_KEY",
        description="Environment variable holding the HMAC key. Unset: a local key file in the state directory.",
    )
    key_secret_block: str | None = Field(
        None, description="Prefect Secret block holding the HMAC key; when set it is required and wins over key_env."
    )
    k: int = Field(5, ge=1, description="k-anonymity over the quasi-identifier columns (see suppression).")
    suppression: Literal["cells", "records"] = Field(
        "cells",
        description="How k-anonymity is reached: cells (local suppression, as sdcMicro: the rare quasi-identifier "
        "values become '*', every row, image and label stays) or records (rows in classes smaller than k are removed).",
    )
    max_drop_fraction: float = Field(
        0.2, ge=0, le=1,
        description="Rows removed here (record suppression, burned-in text quarantined). Past this share of its rows "
        "removed, the stage stops (raise it to accept).",
    )  # fmt: skip
    dicom_dates: Literal["shift", "year"] = Field(
        "shift",
        description="DICOM dates the profile removes: shift (by a keyed per-patient offset that keeps intervals: PS3.15 "
        "Retain Longitudinal Temporal Information with Modified Dates) or year (only the year is kept).",
    )
    burned_in: Literal["quarantine", "redact"] = Field(
        "quarantine",
        description="DICOM images whose header says BurnedInAnnotation YES, or whose pixels show text: quarantined, "
        "or redacted (the text found by OCR blacked out; an image whose text OCR cannot find is quarantined).",
    )
    text_scan: Literal["auto", "always", "never"] = Field(
        "auto",
        description="OCR (Presidio's image redactor with tesseract) of DICOM pixels for burned-in text, for images "
        "whose header does not say BurnedInAnnotation NO: auto (when tesseract is installed, the modalities that "
        "often carry burned-in text: US, SC, OT, XA, RF, ES, XC, DX, CR, MG and the like, or none named; CT, MR, PT "
        "and NM are counted as not scanned), always (every image; tesseract required), never (the header alone "
        "decides). About a second of OCR per 512 px image and core.",
    )
    write_dicom: bool = Field(
        False, description="Also write each DICOM file de-identified (PS3.15 Basic Profile) next to the PNGs."
    )


class LabelConfig(_Section):
    columns: list[str] = Field(
        default_factory=lambda: list(SAMPLE_LABEL_COLUMNS),
        min_length=1,
        description="Annotator columns combined by majority vote; a single column is a plain label column. The "
        "default is the sample's annotators; with the imagefolder layout it becomes [class], the folder name.",
    )
    classes: list[str] | None = Field(None, description="Allowed labels; any other label stops the run. Empty: open set.")
    synonyms: dict[str, str] = Field(
        default_factory=dict, description="Label spellings to map, e.g. {kitty: cat}; case and spaces are folded first."
    )
    min_agreement: float = Field(
        0.5, ge=0, le=1, description="Items whose winning label has a smaller share of the votes go to review."
    )
    tie_policy: Literal["review", "drop", "prefer"] = Field(
        "review", description="Tied votes: to the review queue, dropped (counted), or the preferred annotator's vote."
    )
    prefer_annotator: str | None = Field(None, description="With tie_policy prefer: the label column that breaks ties.")
    consensus: Literal["majority", "dawid_skene"] = Field(
        "majority",
        description="How annotator votes become one label: majority vote, or Dawid-Skene EM (weighs each annotator "
        "by an estimated confusion matrix; min_agreement then applies to the posterior probability).",
    )
    reviewed: str | None = Field(
        None,
        description="A Label Studio export (JSON or JSON-MIN) of the review queue; its labels replace the votes "
        "for the items it covers.",
    )
    find_label_issues: bool = Field(
        True,
        description="Flag likely label errors with cleanlab (out-of-fold probabilities of a cheap model on "
        "thumbnails); advisory: flagged items keep their label and are listed in label_issues.csv for review.",
    )
    issue_folds: int = Field(5, ge=2, le=20, description="Cross-validation folds for the label-error model.")
    issue_min_accuracy: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Label-error flags are computed only when the flagging model's out-of-fold accuracy reaches "
        "this: a weak model flags hard but correct items (cleanlab's own caveat).",
    )
    max_drop_fraction: float = Field(
        0.2, ge=0, le=1, description="Items that had votes but get no training label (review, ties); unlabelled items do not count. Past this share of its rows removed, the stage stops (raise it to accept)."
    )

    @model_validator(mode="after")
    def _preferred_annotator_is_a_column(self) -> LabelConfig:
        if self.tie_policy == "prefer" and self.prefer_annotator not in self.columns:
            raise ValueError("tie_policy prefer needs prefer_annotator set to one of label.columns")
        return self


class SplitConfig(_Section):
    train_fraction: float = Field(0.7, gt=0, lt=1, description="Share of items for training.")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of items for validation.")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of items for the test set.")
    group_column: str | None = Field(
        SAMPLE_GROUP_COLUMN,
        description="Items sharing this (pseudonymized) value stay in one split. The default is the sample's; "
        "with the imagefolder layout it becomes null (each item its own group; near-duplicates still kept together).",
    )
    tolerance: float = Field(
        0.1, gt=0, le=1, description="Largest allowed gap in any class's share between two splits (L-infinity)."
    )
    seed: int = Field(0, description="Seed of the split; the same seed gives the same split.")
    mode: Literal["holdout", "kfold"] = Field(
        "holdout",
        description="holdout: one validation split. kfold (small data): train+val form `folds` grouped, stratified "
        "folds; every trial is cross-validated and the winner is refit on all of them.",
    )
    folds: int = Field(5, ge=2, le=20, description="Folds in kfold mode.")

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        total = self.train_fraction + self.val_fraction + self.test_fraction
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1 (train + val + test = {total:g})")
        return self


class ResampleConfig(_Section):
    strategy: Literal[
        "none", "random_over", "random_under", "smote", "adasyn", "class_weight", "weighted_sampler"
    ] = Field("none", description="Applied to the training split only.")
    sampling_strategy: Literal["auto", "minority", "not minority", "not majority", "all"] = Field(
        "auto", description="imbalanced-learn's sampling_strategy for the samplers."
    )
    k_neighbors: int = Field(5, ge=1, description="SMOTE/ADASYN neighbours; must be below every class's training count.")
    max_synthetic_values: int = Field(
        500_000_000, ge=1, description="SMOTE/ADASYN refuse training sets with more items x pixel values than this."
    )
    drop_label_issues: bool = Field(
        False,
        description="Leave the items the label stage flagged as likely label errors out of the training split "
        "(opt-in; counted in the resample report). Validation and test always keep them.",
    )
    seed: int = Field(0)


def default_augmentation() -> dict[str, Any]:
    """A mild policy for small grayscale images, in albumentations' own dict format (`A.from_dict`)."""
    return {
        "transform": {
            "__class_fullname__": "Compose",
            "p": 1.0,
            "transforms": [
                {
                    "__class_fullname__": "Affine",
                    "p": 0.7,
                    "scale": [0.9, 1.1],
                    "translate_percent": [-0.08, 0.08],
                    "rotate": [-10.0, 10.0],
                    "border_mode": 0,
                },
            ],
        }
    }


class TrainConfig(_Section):
    model: str = Field(
        "small_cnn",
        description="Architecture: small_cnn (mlpipe's VGG-style network, sized to ingest.image_size) or any timm "
        "architecture name (timm.list_models(): resnet18, convnext_tiny, efficientnet_b0, ...).",
    )
    pretrained: str | None = Field(
        None,
        description="Starting weights. A timm pretrained tag (e.g. a1_in1k, or resnet18.tv_in1k for torchvision's "
        "ImageNet weights), downloaded once into the standard cache; a local weights file (.pth, .safetensors: "
        "timm's or torchvision's state dict); or a local folder holding that cache (air-gapped machines). "
        "null: random initialization.",
    )
    freeze: Literal["none", "backbone"] = Field("none", description="backbone: train only the classifier head, throughout.")
    freeze_epochs: int = Field(
        0, ge=0, le=1000, description="Epochs at the start in which only the classifier head learns, then all layers "
        "(fastai's fine_tune freezes for 1); for pretrained weights.",
    )  # fmt: skip
    backbone_lr_scale: float | Literal["auto"] = Field(
        "auto",
        description="The backbone's learning rate as a share of train.lr (the head gets train.lr). auto: 0.1 with "
        "pretrained weights (discriminative fine-tuning, Howard and Ruder 2018), 1 from scratch.",
    )
    steps: int = Field(
        2000, ge=1, le=10_000_000,
        description="Training budget in optimizer steps: epochs = ceil(steps / steps per epoch), at least "
        "train.min_epochs, so a small dataset gets as many updates as a large one and a large one still sees "
        "every item min_epochs times. train.epochs, when set, replaces both.",
    )  # fmt: skip
    min_epochs: int = Field(10, ge=1, le=100_000, description="The least epochs a train.steps budget gives (large datasets).")
    max_epochs: int = Field(
        200, ge=1, le=100_000,
        description="The most epochs a train.steps budget gives: 100 images would otherwise be seen 1,300 times, "
        "each epoch paying for a validation pass and a checkpoint.",
    )  # fmt: skip
    epochs: int | None = Field(None, ge=1, le=100_000, description="Budget in epochs instead of train.steps; null: from steps.")
    batch_size: int = Field(64, ge=1, le=65536, description="Per-process batch size.")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw")
    lr: float = Field(3e-3, gt=0, le=10, description="Peak learning rate (after warmup, before the schedule decays it).")
    weight_decay: float = Field(1e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    ema_decay: float | None = Field(
        0.999, ge=0, lt=1,
        description="Keep an exponential moving average of the weights (timm's ModelEmaV3, decay warmed up as "
        "1 - (1 + step)^-3/4, capped here) and validate, checkpoint and ship the average instead of the last "
        "weights (Polyak and Juditsky 1992); null: off.",
    )  # fmt: skip
    loss: Literal["cross_entropy", "focal"] = Field("cross_entropy", description="focal: (1-p)^gamma-weighted cross-entropy.")
    focal_gamma: float = Field(2.0, ge=0, le=10)
    scheduler: Literal["cosine", "onecycle", "step", "constant"] = Field(
        "cosine", description="Learning-rate schedule, stepped per batch, after the warmup."
    )
    warmup_epochs: float | Literal["auto"] = Field(
        "auto", description="Linear warmup (epochs; fractions allowed). auto: 5% of the budget (Goyal et al. 2017 warm "
        "up large learning rates), at least one step.",
    )  # fmt: skip
    step_epochs: int = Field(10, ge=1, description="step schedule: multiply the rate by step_gamma every this many epochs.")
    step_gamma: float = Field(0.1, gt=0, le=1)
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient norm to this value; null: no clipping.")
    sync_batchnorm: bool = Field(False, description="SyncBatchNorm across GPUs (CUDA, more than one process).")
    compile: Literal["off", "default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        "off", description="torch.compile mode; compiling costs start-up time (minutes for max-autotune)."
    )
    nccl_timeout_s: int = Field(600, ge=10, le=86400, description="Collective timeout: a hung rank fails the job after this.")
    patience: int | Literal["auto"] = Field(
        "auto",
        description="Early stopping: epochs without validation macro-F1 gain (at equal macro-F1, a lower "
        "validation loss counts as a gain). auto: a quarter of the epochs, at least 5.",
    )
    augment: dict[str, Any] | None = Field(
        default_factory=default_augmentation,
        description="albumentations policy in its dict serialization (A.to_dict); null for none.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available.")
    nproc: int | Literal["auto"] = Field("auto", description="DDP processes; auto: one per GPU, else 1.")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description="auto: bf16 on CUDA, off on CPU.")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader workers per process.")
    max_restarts: int = Field(0, ge=0, le=100, description="torchrun restarts of failed workers.")
    nnodes: int = Field(
        1,
        ge=1,
        le=1024,
        description="Machines in one training job (train.nproc processes each); >1 needs rdzv_endpoint, "
        "search.max_parallel 1, `mlpipe join` on the other machines and a state directory (MLPIPE_HOME) on "
        "storage every node mounts at the same path.",
    )
    rdzv_endpoint: str | None = Field(
        None, description="host:port of the c10d rendezvous, on the node that runs the pipeline (train.nnodes > 1)."
    )
    rdzv_timeout_s: int = Field(
        900, ge=10, le=86400, description="How long a multi-node launch waits for the other nodes to join."
    )
    seed: int = Field(0)

    _nproc_positive = field_validator("nproc")(_at_least_one_or_auto)
    _patience_positive = field_validator("patience")(_at_least_one_or_auto)

    @field_validator("model")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        from mlpipe.train.model import is_known

        if not is_known(value):
            raise ValueError(f"unknown architecture '{value}': small_cnn or a timm name (timm.list_models())")
        return value

    @field_validator("backbone_lr_scale", "warmup_epochs")
    @classmethod
    def _share_or_auto(cls, value: float | str, info) -> float | str:
        low_ok = info.field_name == "warmup_epochs"
        if not isinstance(value, str) and (value < 0 or (value == 0 and not low_ok) or
                                           (info.field_name == "backbone_lr_scale" and value > 1)):
            raise ValueError("must be 'auto' or " + ("at least 0" if low_ok else "in (0, 1]"))
        return value

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, _, port = value.rpartition(":")
        if not (host and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"must be host:port with a port in 1..65535 (got {value!r})")
        return value

    @model_validator(mode="after")
    def _several_nodes_need_an_endpoint(self) -> TrainConfig:
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"nnodes {self.nnodes} needs rdzv_endpoint (host:port of the rendezvous on this node)")
        return self


TRIAL_SECTIONS = ("resample", "train")


# search.grid auto: the sample's grid for sample://digits, USER_GRID for every other source.
SAMPLE_GRID: dict[str, list[Any]] = {"train.lr": [0.002, 0.006]}
USER_GRID: dict[str, list[Any]] = {"train.lr": [0.001, 0.003]}


class SearchConfig(_Section):
    grid: dict[str, list[Any]] | Literal["auto"] = Field(
        "auto",
        description="Dotted config keys (resample.* or train.*) to lists of values; every combination is one trial. "
        "auto: for sample://digits two learning rates, 0.002 and 0.006, of 2000 steps each (they replaced four "
        "trials, two rates x two resampling strategies, of 1000 at the same cost: on Fashion-MNIST 10,000, "
        "benchmarks/model_quality.py, test macro-F1 0.911 against 0.895, against the RBF SVC's 0.875 on the same "
        "split); for any other source two learning rates, 0.001 and 0.003 (AdamW's usual range: real images vary "
        "more than the sample; not benchmarked), resolved before the run and recorded.",
    )
    metric: Literal["val_macro_f1", "val_accuracy", "val_balanced_accuracy"] = Field(
        "val_macro_f1", description="Validation metric that picks the winner."
    )
    strategy: Literal["grid", "halving"] = Field(
        "grid",
        description="grid: every trial for train.epochs. halving: successive halving with epochs as the resource; "
        "after each rung only the best 1/halving_factor continue, from their checkpoints.",
    )
    halving_factor: int = Field(3, ge=2, le=10, description="Successive halving: keep 1/factor, multiply epochs by factor.")
    min_epochs: int = Field(1, ge=1, description="Successive halving: epochs of the first rung.")
    tie_break: Literal["val_macro_f1", "val_accuracy", "val_balanced_accuracy", "val_loss"] = Field(
        "val_loss",
        description="Secondary validation metric for trials tied on `metric` (val_loss: lower wins). A small "
        "validation split often gives several trials macro-F1 1.0, and accuracy 1.0 too: the loss still ranks them.",
    )
    refit: bool = Field(
        False,
        description="Retrain the winner on train+val for its best epoch count before the test (always on in "
        "split.mode kfold, where no single trial model saw all the data).",
    )
    max_parallel: int | Literal["auto"] = Field(
        1,
        description="Trials trained at once, each its own torchrun launch. auto: one trial per GPU (train.nproc "
        "auto becomes 1 during the search; an explicit train.nproc takes that many GPUs a trial), on CPU as many as "
        "the cores hold at train.nproc processes each. 1: all trials in one launch, one after another.",
    )
    task_runner: Literal["thread", "process", "dask"] = Field(
        "thread",
        description="Prefect task runner that fans the parallel launches out: thread or process on this machine, "
        "dask on a Dask cluster (dask_address) or a local one. Trial folders must be on storage all workers share.",
    )
    dask_address: str | None = Field(
        None, description="Scheduler of an existing Dask cluster (tcp://host:8786); null: a local cluster."
    )

    _max_parallel_positive = field_validator("max_parallel")(_at_least_one_or_auto)

    @model_validator(mode="after")
    def _dask_address_needs_dask(self) -> SearchConfig:
        if self.dask_address and self.task_runner != "dask":
            raise ValueError("search.dask_address is set but search.task_runner is not 'dask'")
        return self


class EvaluateConfig(_Section):
    registered_model_name: str = Field("mlpipe-classifier", min_length=1, description="MLflow Model Registry name.")
    gate_metric: Literal["macro_f1", "balanced_accuracy", "accuracy"] = Field(
        "macro_f1", description="Test metric the registry gate compares challenger and champion on."
    )
    min_improvement: float = Field(0.0, ge=0, le=1, description="Least gain over the champion for a promotion.")
    max_recall_drop: float = Field(0.05, ge=0, le=1, description="Largest allowed drop of any class's recall.")
    thresholds: dict[Literal["macro_f1", "balanced_accuracy", "accuracy"], float] = Field(
        default_factory=lambda: {"macro_f1": 0.5}, description="Absolute floors every promoted model must meet."
    )
    bootstrap_resamples: int = Field(1000, ge=100, le=100_000, description="Bootstrap resamples for CIs and the gate.")
    seed: int = Field(0, description="Seed of the bootstrap.")
    positive_class: str | None = Field(
        None, min_length=1,
        description="Two classes only: the class whose probability is scored (ROC-AUC, PR-AUC) and thresholded. "
        "None: the minority class of the training split (a tie: the later class in the class map).",
    )  # fmt: skip
    threshold: Literal["auto"] | float = Field(
        "auto",
        description="Two classes only: predict the positive class when its probability is >= this (0 < t < 1). "
        "auto: chosen on the validation split by `threshold_rule`, recorded, and applied unchanged to the test set.",
    )
    threshold_rule: Literal["f1", "youden"] = Field(
        "f1", description="threshold auto: maximize the positive class's F1, or Youden's J (TPR - FPR), on validation data."
    )
    baseline: bool = Field(
        True, description="Fit a logistic regression and an RBF SVC on pixels (chosen on validation data), report them "
        "beside the deep model, and refuse to promote a deep model that does not beat the best of them.",
    )  # fmt: skip
    allow_baseline_champion: bool = Field(
        False, description="Register the best baseline instead of the deep model when it beats the deep model on the "
        "test set and meets evaluate.thresholds (needs evaluate.baseline).",
    )  # fmt: skip

    @field_validator("threshold")
    @classmethod
    def _threshold_inside_0_1(cls, value: str | float) -> str | float:
        if not isinstance(value, str) and not 0 < value < 1:
            raise ValueError(f"must be 'auto' or a probability strictly between 0 and 1 (got {value})")
        return value

    @model_validator(mode="after")
    def _baseline_champion_needs_baselines(self) -> EvaluateConfig:
        if self.allow_baseline_champion and not self.baseline:
            raise ValueError("evaluate.allow_baseline_champion needs evaluate.baseline: true (no baseline is fitted)")
        return self


class PipelineConfig(_Section):
    experiment: str = Field("mlpipe", min_length=1, description="MLflow experiment name.")
    source: SourceConfig = Field(default_factory=SourceConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    anonymize: AnonymizeConfig = Field(default_factory=AnonymizeConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    resample: ResampleConfig = Field(default_factory=ResampleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _one_multi_node_launch_at_a_time(self) -> PipelineConfig:
        if self.train.nnodes > 1 and self.search.max_parallel != 1:
            raise ValueError(
                f"train.nnodes {self.train.nnodes} needs search.max_parallel 1 (one rendezvous endpoint serves "
                f"one launch at a time; got {self.search.max_parallel!r})"
            )
        return self

    @model_validator(mode="after")
    def _train_fits_the_images(self) -> PipelineConfig:
        """Probe train.augment and train.model against ingest.channels and ingest.image_size (see
        `mlpipe.train.compat`). Keys the grid varies are probed per combination by `_grid_is_valid`."""
        from mlpipe.train import compat  # lazy: albumentations and torch load on the first validation only

        channels, size = self.ingest.channels, self.ingest.image_size
        if channels == "auto" or size == "auto":  # probed once the data has decided them (`resolve_auto`)
            return self
        varied = {key.split(".")[1] for key in self.grid() if key.startswith("train.")}
        problem = None if "augment" in varied else compat.augmentation_problem(self.train.augment, channels, size)
        if problem is None and "model" not in varied:
            problem = compat.model_problem(self.train.model, channels, size)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _grid_is_valid(self) -> PipelineConfig:
        for key, values in self.grid().items():
            if key.split(".")[0] not in TRIAL_SECTIONS:
                raise ValueError(f"search.grid key '{key}' cannot vary per trial (only resample.* and train.*)")
            if not values:
                raise ValueError(f"search.grid key '{key}' has no values")
        try:
            self.trials()  # every combination must itself be a valid config
        except MlpipeError as err:  # as a ValueError, so the Prefect form shows it as a validation error
            raise ValueError(f"search.grid: {str(err).split(' error: ', 1)[-1]}") from None
        return self

    def grid(self) -> dict[str, list[Any]]:
        """search.grid, with auto resolved: SAMPLE_GRID for sample://digits, USER_GRID for any other source."""
        if self.search.grid != "auto":
            return self.search.grid
        return copy.deepcopy(SAMPLE_GRID if self.source.uri == SAMPLE_URI else USER_GRID)

    def trials(self) -> list[Trial]:
        """One `Trial` per grid combination, in ParameterGrid order (a single trial for an empty grid)."""
        grid = self.grid()
        if not grid:
            return [Trial(index=0, params={}, resample=self.resample, train=self.train)]
        data = self.model_dump(mode="json")
        data["search"]["grid"] = {}
        trials = []
        for index, params in enumerate(ParameterGrid(grid)):
            cfg = _validate(_apply(copy.deepcopy(data), params), where="search.grid")
            trials.append(Trial(index=index, params=params, resample=cfg.resample, train=cfg.train))
        return trials

    def with_overrides(self, overrides: dict[str, Any]) -> PipelineConfig:
        return _validate(_apply(self.model_dump(mode="json"), overrides))


class Trial(_Section):
    """One point of the grid: its overrides and the resolved per-trial sections."""

    index: int
    params: dict[str, Any]
    resample: ResampleConfig
    train: TrainConfig

    @property
    def name(self) -> str:
        return f"trial-{self.index:03d}"

    def flat_params(self) -> dict[str, str]:
        """The trial's resolved resample and train sections, for its MLflow child run."""
        out = {"trial": self.name}
        for section in ("resample", "train"):
            for key, value in getattr(self, section).model_dump(mode="json").items():
                out[f"{section}.{key}"] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        return out


def _apply(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for i, part in enumerate(parents):
            if node.get(part) == "auto" and _is_open_mapping(parents[: i + 1]):  # one axis set: the grid is explicit
                node[part] = {}
            if not isinstance(node.get(part), dict):
                raise MlpipeError(f"config error: unknown key '{'.'.join(parents[: i + 1])}' in '{dotted}'")
            node = node[part]
        if leaf not in node and not _is_open_mapping(parents):
            raise MlpipeError(f"config error: unknown key '{dotted}'")
        node[leaf] = value
    return data


# Mappings whose keys are user data, not schema. A file that sets one replaces it whole: a
# dataset's policy must list its own columns, never inherit the sample's.
_OPEN_MAPPINGS = {"anonymize.policy", "search.grid"}
_WHOLE_VALUES = _OPEN_MAPPINGS | {"train.augment"}


def _is_open_mapping(parents: list[str]) -> bool:
    return ".".join(parents) in _OPEN_MAPPINGS


def _validate(data: Any, where: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise MlpipeError(f"{where} error: {format_validation_error(exc)}") from None


def format_validation_error(exc: ValidationError) -> str:
    """All problems on one line: `train.lr: Input should be greater than 0 (got -1)`."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        elif err["type"] == "value_error":  # our own validators: the message names its key
            message = str(err["ctx"]["error"])
            parts.append(message if not err["loc"] else f"{key}: {message}")
        else:
            value = err.get("input")
            huge = isinstance(value, int) and value.bit_length() > 4000  # past Python's digit limit: no repr
            got = f" (got {value!r})" if not isinstance(value, dict | list) and not huge else ""
            parts.append(f"{key}: {err['msg']}{got}")
    return "; ".join(parts)


def parse_set(assignment: str) -> tuple[str, Any]:
    """`train.lr=0.01` -> ("train.lr", 0.01); the value is read as YAML, so lists and numbers work."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise MlpipeError(f"--set expects dotted.key=value, got '{assignment}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an integer past Python's digit limit
        value = raw
    return key.strip(), value


class ScoringConfig(_Section):
    """The scoring-pipeline flow's only parameter (its UI form)."""

    experiment: str = Field("mlpipe-scoring", min_length=1, description="MLflow experiment of the scoring runs.")
    model: str = Field("models:/mlpipe-classifier@champion", description="MLflow model URI of the model that scores.")
    source: SourceConfig = Field(default_factory=SourceConfig, validate_default=True, description="The images to score; a manifest may "
                                 "omit the training labels' columns. Its other columns follow the model's policy. "
                                 "source.layout auto means manifest here.")  # fmt: skip
    destination: str = Field("", description="Folder (a path or fsspec URL) that gets predictions-RUN_ID.csv; "
                             "empty: <state dir>/scoring.")  # fmt: skip
    drift_threshold: float = Field(0.25, gt=0, description="Population stability index above which a check marks "
                                   "the run as drifted (0.25: a significant shift, Siddiqi 2006).")  # fmt: skip
    batch_size: int = Field(256, ge=1, description="Images per forward pass.")

    @field_validator("source")
    @classmethod
    def _auto_layout_is_a_manifest(cls, value: SourceConfig) -> SourceConfig:
        # Images to score rarely sit in class folders: source.layout auto means manifest here.
        return value.model_copy(update={"layout": "manifest"}) if value.layout == "auto" else value


def load_config(path: str | Path | None = None, sets: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Defaults, then the YAML file, then each `--set`; validated once at the end."""
    data: dict[str, Any] = PipelineConfig().model_dump(mode="json")
    if path is not None:
        file_data = _read_yaml(Path(path))
        data = _deep_merge(data, file_data)
    data = _apply(data, dict(parse_set(s) for s in sets))
    if _expanded_size(data) > MAX_CONFIG_VALUES:  # YAML aliases share; validation and hashing would expand them
        raise MlpipeError(f"config error: more than {MAX_CONFIG_VALUES} values once YAML aliases are expanded")
    return _validate(data)


MAX_CONFIG_VALUES = 100_000


def _expanded_size(value: Any) -> int:
    """Values in `value` with shared (aliased) parts counted each time; stops past the limit."""
    count, stack = 0, [value]
    while stack and count <= MAX_CONFIG_VALUES:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set):
            stack.extend(item)
    return count


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MlpipeError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))  # safe_load: no !!python tags
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8, an integer past the digit limit
        raise MlpipeError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise MlpipeError(f"config file {path} must hold a mapping at the top level")
    return loaded


def _deep_merge(base: dict[str, Any], extra: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    for key, value in extra.items():
        dotted = prefix + str(key)  # YAML keys may be null, numbers or booleans
        if isinstance(value, dict) and isinstance(base.get(key), dict) and dotted not in _WHOLE_VALUES:
            base[key] = _deep_merge(base[key], value, dotted + ".")
        else:
            base[key] = value  # unknown keys pass through so that validation names them
    return base


def to_yaml(config: PipelineConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flat_params(config: PipelineConfig) -> dict[str, str]:
    """The resolved config as `section.key -> value` strings, for MLflow params."""
    out: dict[str, str] = {}
    for section, values in config.model_dump(mode="json").items():
        if not isinstance(values, dict):
            out[section] = str(values)
            continue
        for key, value in values.items():
            out[f"{section}.{key}"] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out


class DataFacts(_Section):
    """What `mlpipe.ingest.detect` read from a sample of the source: the inputs of every auto value."""

    layout: Literal["manifest", "imagefolder", "dicom"]
    channels: Literal[1, 3]
    median_side: int | None = Field(description="Median of max(width, height) in pixels; None: no image readable.")
    dicom: bool = Field(False, description="The rows name DICOM files (their header attributes are columns).")
    dicom_group: str | None = Field(None, description="The header attribute DICOM items are grouped by for the split: "
                                    "PatientID, StudyInstanceUID when no file has a PatientID, None when neither.")  # fmt: skip


def clamped_side(median_side: int) -> int:
    """`median_side` (pixels) within AUTO_SIZE_RANGE: ingest.image_size auto before any architecture is weighed."""
    low, high = AUTO_SIZE_RANGE
    return min(max(median_side, low), high)


def auto_image_size(median_side: int, models: list[str], channels: int) -> int:
    """ingest.image_size auto: `median_side` clamped to AUTO_SIZE_RANGE, then raised to the
    smallest side every architecture in `models` runs at with `channels` channels (the probe of
    `mlpipe.train.compat`). Pixels in, pixels out."""
    from mlpipe.train import compat  # lazy: torch loads on first use

    size = clamped_side(median_side)
    for name in sorted(set(models)):
        if compat.model_problem(name, channels, size) is not None:
            size = compat._smallest_working_size(name, channels, size) or size  # None: the revalidation says why
    return size


def resolve_auto(config: PipelineConfig, facts: DataFacts | None) -> tuple[PipelineConfig, dict[str, Any]]:
    """(config with every data-dependent default decided, {dotted key: value it got}). Pure: the
    facts come from `mlpipe.ingest.detect`; the result is revalidated whole, so the compatibility
    probes of train.model and train.augment run on the decided channels and size. Decides:
    source.layout, ingest.channels and ingest.image_size when auto; search.grid auto (`grid`);
    and for the imagefolder and dicom layouts the sample's defaults that name manifest columns a
    listing cannot have: label.columns -> [class] (dicom: an error, it must name a header
    attribute), anonymize.policy -> {}, split.group_column -> PatientID (pseudonymized by the
    DICOM profile; StudyInstanceUID, remapped, when no file has a PatientID) when the files are
    DICOM, else null. Explicit values are never changed. `facts` may be None only when
    source.layout, ingest.channels and ingest.image_size are all explicit. Raises MlpipeError
    (one line) when the decided config is invalid or image_size auto has no readable image to go by."""
    if facts is None and "auto" in (config.source.layout, config.ingest.channels, config.ingest.image_size):
        raise ValueError("resolve_auto needs the data's facts (mlpipe.ingest.detect) for auto layout, channels or size")
    out = auto_overrides(config, facts)
    if config.ingest.image_size == "auto" and "ingest.image_size" not in out:
        raise MlpipeError("ingest.image_size auto: none of the sampled images could be read; set ingest.image_size")
    return (config.with_overrides(out) if out else config), out


def auto_overrides(config: PipelineConfig, facts: DataFacts | None) -> dict[str, Any]:
    """What `resolve_auto` sets, unvalidated: {dotted key: value}. image_size auto is left out when
    no sampled image was readable (facts.median_side None)."""
    out: dict[str, Any] = {}
    if config.source.layout == "auto":
        out["source.layout"] = facts.layout
    layout = out.get("source.layout", config.source.layout)
    channels = config.ingest.channels
    if channels == "auto":
        channels = out["ingest.channels"] = facts.channels
    if config.ingest.image_size == "auto" and facts.median_side is not None:
        models = [config.train.model, *config.grid().get("train.model", [])]
        out["ingest.image_size"] = auto_image_size(facts.median_side, models, channels)
    if config.search.grid == "auto":
        out["search.grid"] = config.grid()
    if layout in ("imagefolder", "dicom"):
        if config.label.columns == SAMPLE_LABEL_COLUMNS:
            if layout == "dicom":
                raise MlpipeError("source.layout dicom: the files are not in class folders (root/<class>/<file>); set "
                                  "label.columns to the header attribute that holds the label, e.g. [BodyPartExamined]")  # fmt: skip
            out["label.columns"] = [IMAGEFOLDER_LABEL]
        sample = _sample_policy()
        if any(config.anonymize.policy.get(c) == p for c, p in sample.items()):  # the sample's entries, maybe with
            out["anonymize.policy"] = {c: p.model_dump(exclude_defaults=True) for c, p in config.anonymize.policy.items()
                                       if sample.get(c) != p}  # the user's added on top  # fmt: skip
        if config.split.group_column == SAMPLE_GROUP_COLUMN:
            out["split.group_column"] = facts.dicom_group if facts is not None and facts.dicom else None
    return out
