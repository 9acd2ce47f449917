"""baseline: fast classical models on the same split as the deep model, so that every run shows
what a logistic regression and an RBF-kernel SVC reach without deep learning (issue 17, item 3).

Features (`PixelFeatures`, one implementation for fitting and serving): an image's raw pixel
values (0-255) divided by 255, average-pooled by the integer factor `pool_factor(H, W)` (1 up to
MAX_SIDE px, so 28x28 keeps all 784 pixels; 224x224 is pooled by 7 to 32x32; a remainder row or
column is dropped, as `avg_pool2d` does), flattened in channel, row, column order, and
standardized per feature with the mean and standard deviation of the training items used (a
constant feature gets std 1). No pretrained backbone features: pixels only.

Fitting reads the training split (as the split stage made it, never the resampled training
sets) and chooses each model's hyperparameters on the validation split's macro-F1 alone (first
best in grid order on a tie); the test split is no argument of anything here. Training items are
capped per model (LR_MAX_ITEMS, SVC_MAX_ITEMS: a seeded, class-proportional subsample that keeps
every class) and so are the validation items that choose (VAL_MAX_ITEMS); the report records
how many were used.

Each fitted model is also a torch module with the registered model's contract (raw pixels 0-255,
NCHW float32 in, class probabilities out), computed in float64:
- logistic regression: exactly scikit-learn's `predict_proba`, softmax(W @ features + b).
- RBF SVC: exactly scikit-learn's `decision_function` (the RBF kernel to the support vectors,
  the dual coefficients and intercepts of every one-vs-one pair, then scikit-learn's one-vs-rest
  transform: votes plus bounded confidences); with `break_ties=True` its argmax is
  scikit-learn's `predict`. Probabilities are softmax(decision / T) (two classes: sigmoid(d / T)),
  the temperature T chosen on the validation items' log loss: a calibration of our own, not
  scikit-learn's Platt scaling (`probability=True`, fitted by internal cross-validation, which
  also predicts differently from `predict`). The argmax, hence every hard label, is unchanged.
`check_parity` compares a module with its estimator on given items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits
from torch import nn

from mlpipe.errors import MlpipeError

MAX_SIDE = 32  # pixels per side after pooling: at most 32*32*channels features
LR_MAX_ITEMS = 10_000
SVC_MAX_ITEMS = 10_000  # an RBF SVC's fit grows about quadratically with its training items; the panel's largest set (7,000) fits whole
VAL_MAX_ITEMS = 5_000  # the SVC's prediction cost is validation items x support vectors
LR_GRID = {"C": (0.001, 0.01, 0.1), "class_weight": (None, "balanced")}
SVC_GRID = {"C": (1.0, 10.0), "class_weight": (None, "balanced")}
PARITY_MAX_ITEMS = 1_000  # test items `check_parity` compares in evaluate (scikit-learn's SVC predicts slowly)
TEMPERATURES = np.geomspace(0.02, 20, 31)
FEATURES = (f"pixels / 255, average-pooled to at most {MAX_SIDE}x{MAX_SIDE} per channel (no pooling up to "
            f"{MAX_SIDE} px), flattened, standardized with the training items' mean and std")  # fmt: skip
NAMES = ("logistic_regression", "rbf_svc")


def pool_factor(height: int, width: int) -> int:
    """The smallest integer factor that brings both sides to MAX_SIDE or fewer pixels."""
    return max(1, math.ceil(max(height, width) / MAX_SIDE))


class PixelFeatures(nn.Module):
    """Raw pixels (N, C, H, W; 0-255, float32) -> standardized features (N, D), float64."""

    def __init__(self, pool: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.pool = int(pool)
        self.register_buffer("mean", mean.double().clone())  # copies: never a view of an estimator's arrays
        self.register_buffer("std", std.double().clone())

    def forward(self, x):
        x = x.double() / 255.0
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        return (x.flatten(1) - self.mean) / self.std


class LogisticBaseline(nn.Module):
    """softmax(W @ features + b): scikit-learn's multinomial `predict_proba`, class probabilities out (float32)."""

    kind = "logistic_regression"

    def __init__(self, features: PixelFeatures, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.features = features
        self.register_buffer("weight", weight.double().clone())  # (classes, D)
        self.register_buffer("bias", bias.double().clone())  # (classes,)

    def forward(self, x):
        return (self.features(x) @ self.weight.T + self.bias).softmax(dim=1).float()


class RbfSvcBaseline(nn.Module):
    """scikit-learn's SVC decision function (one-vs-rest shape) to temperature-scaled probabilities (float32)."""

    kind = "rbf_svc"

    def __init__(self, features: PixelFeatures, support: torch.Tensor, gamma: torch.Tensor, coef: torch.Tensor,
                 intercept: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                 temperature: torch.Tensor):  # fmt: skip
        super().__init__()
        self.features = features
        for name, value in {"support": support, "gamma": gamma, "coef": coef, "intercept": intercept,
                            "first": first, "second": second, "temperature": temperature}.items():  # fmt: skip
            self.register_buffer(name, value.double().clone())
        # support (S, D); coef (S, pairs); intercept (pairs,); first/second (pairs, classes): one-hot of i and j

    def decision(self, x):
        """scikit-learn's `decision_function`: (N,) for two classes (> 0: class 1), else (N, classes)."""
        return self.decision_from_features(self.features(x))

    def decision_from_features(self, f):
        sq = (f * f).sum(1, keepdim=True) + (self.support * self.support).sum(1) - 2 * f @ self.support.T
        dec = torch.exp(-self.gamma * sq.clamp(min=0)) @ self.coef + self.intercept  # (N, pairs); > 0: i wins
        if self.first.shape[1] == 2:
            return dec[:, 0]
        votes = (dec >= 0).double() @ self.first + (dec < 0).double() @ self.second
        confidence = dec @ (self.first - self.second)
        return votes + confidence / (3 * (confidence.abs() + 1))

    def forward(self, x):
        dec = self.decision(x)
        logits = torch.stack([torch.zeros_like(dec), dec], dim=1) if dec.dim() == 1 else dec
        return (logits / self.temperature).softmax(dim=1).float()


@dataclass
class Baseline:
    """One fitted classical model: its chosen params, validation macro-F1 (the choice), every grid
    point's validation macro-F1, the scikit-learn estimator and its serving module."""

    name: str
    params: dict[str, Any]
    val_macro_f1: float
    grid: dict[str, float]
    estimator: Any
    module: nn.Module
    train_items: int
    val_items: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"params": self.params, "val_macro_f1": round(self.val_macro_f1, 6), "grid_val_macro_f1": self.grid,
                "train_items": self.train_items, "val_items": self.val_items, "notes": self.notes}  # fmt: skip


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC (as `load_split` returns) -> float32 NCHW, the serving contract's input."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


@torch.no_grad()
def run_module(module: nn.Module, images: np.ndarray, method: str = "forward", batch_size: int = 1024) -> np.ndarray:
    """A module (or one of its methods) over uint8 NHWC images, in batches; float64 numpy out."""
    fn = getattr(module, method) if method != "forward" else module
    out = [fn(to_nchw(images[i : i + batch_size])).double().numpy() for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def subsample(y: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Sorted positions of at most about `cap` items (class-proportional, at least one per class
    present; seeded), or all positions when there are no more than `cap`."""
    if len(y) <= cap:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(y == k), max(1, round(cap * (y == k).mean())), replace=False)
              for k in np.unique(y)]  # fmt: skip
    return np.sort(np.concatenate(chosen))


def _choose(make, grid: dict[str, tuple], x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, k: int,
            predict=None):  # fmt: skip
    """Fit every grid point on (x, y); keep the best validation macro-F1 (first in grid order on a
    tie). `predict(estimator, xv)`: hard labels, default the estimator's `predict`."""
    best, scores = None, {}
    for c in grid["C"]:
        for weight in grid["class_weight"]:
            estimator = make(c, weight).fit(x, y)
            pred = predict(estimator, xv) if predict else estimator.predict(xv)
            score = float(f1_score(yv, pred, labels=np.arange(k), average="macro", zero_division=0))
            scores[f"C={c:g}, class_weight={weight}"] = round(score, 6)
            if best is None or score > best[0]:
                best = (score, {"C": c, "class_weight": weight}, estimator)
    return best, scores


def fit_baselines(train_images: np.ndarray, train_y: np.ndarray, val_images: np.ndarray, val_y: np.ndarray,
                  num_classes: int, seed: int = 0, train_total: int | None = None,
                  refit_on: tuple[np.ndarray, np.ndarray, int] | None = None) -> dict[str, Baseline]:  # fmt: skip
    """Fit the logistic regression and the RBF SVC on training items (uint8 NHWC images, integer
    labels 0..num_classes-1) and choose each one's C and class_weight on the validation items'
    macro-F1. `train_total`: the size of the training split these items were drawn from (default:
    all of them), for the notes. `refit_on`: (images, labels, their split's size) of train+val,
    when the deep model was refit on them: each baseline is then refit there too, with the C,
    class_weight and SVC temperature chosen on validation (the deep model's refit keeps its
    validation-chosen epochs the same way), so neither side sees more data than the other.
    Returns {name: Baseline} in NAMES order. Raises MlpipeError when a class has no training
    item or the image sets differ in shape."""
    if train_images.shape[1:] != val_images.shape[1:]:
        raise MlpipeError(f"baseline: training images {train_images.shape[1:]} and validation images "
                          f"{val_images.shape[1:]} differ in shape")  # fmt: skip
    absent = sorted(set(range(num_classes)) - set(np.unique(train_y).tolist()))
    if absent:
        raise MlpipeError(f"baseline: class index(es) {absent} have no training item; a classifier cannot learn them")
    total = train_total or len(train_y)
    rows = subsample(train_y, LR_MAX_ITEMS, seed)
    features = fit_features(train_images[rows])
    x, y = run_module(features, train_images[rows]), train_y[rows]
    val_rows = subsample(val_y, VAL_MAX_ITEMS, seed)
    xv, yv = run_module(features, val_images[val_rows]), val_y[val_rows]
    svc_rows = subsample(y, SVC_MAX_ITEMS, seed)
    gamma = 1.0 / (x.shape[1] * x[svc_rows].var())  # scikit-learn's gamma="scale", fixed so the module can use it

    def logistic(c, weight):
        return LogisticRegression(C=c, class_weight=weight, max_iter=200, tol=1e-3)

    def rbf_svc(c, weight):
        return SVC(C=c, kernel="rbf", gamma=gamma, class_weight=weight, break_ties=num_classes > 2)

    def svc_predict(estimator, f):  # libsvm's kernel loop: 2 s per 2,000 x 2,000 items; BLAS is ~20x faster
        return svc_labels(svc_torch(estimator, features, num_classes).decision_from_features(torch.from_numpy(f)))

    # One BLAS/OpenMP thread: on two cores shared with other work, threads that spin-wait made
    # these small fits 3-8x slower than one thread (measured); the fits are small either way.
    with threadpool_limits(limits=1):
        (lr_score, lr_params, lr), lr_grid = _choose(logistic, LR_GRID, x, y, xv, yv, num_classes)
        (svc_score, svc_params, svc), svc_grid = _choose(rbf_svc, SVC_GRID, x[svc_rows], y[svc_rows], xv, yv,
                                                         num_classes, svc_predict)  # fmt: skip
    temperature = choose_temperature(run_module(svc_torch(svc, features, num_classes), val_images[val_rows], "decision"), yv)
    svc_params = {**svc_params, "gamma": float(gamma), "temperature": float(temperature)}
    refit = ""
    if refit_on is not None:
        all_images, all_y, total = refit_on
        if all_images.shape[1:] != train_images.shape[1:]:
            raise MlpipeError(f"baseline: refit images {all_images.shape[1:]} and training images "
                              f"{train_images.shape[1:]} differ in shape")  # fmt: skip
        rows = subsample(all_y, LR_MAX_ITEMS, seed)
        x, y = run_module(features, all_images[rows]), all_y[rows]
        svc_rows = subsample(y, SVC_MAX_ITEMS, seed)
        with threadpool_limits(limits=1):
            lr = logistic(lr_params["C"], lr_params["class_weight"]).fit(x, y)
            svc = rbf_svc(svc_params["C"], svc_params["class_weight"]).fit(x[svc_rows], y[svc_rows])
        refit = " (refit on train+val, as the deep model was)"
    svc_module = svc_torch(svc, features, num_classes, temperature)

    def notes(used: int) -> list[str]:
        pooled = [f"pixels pooled by {features.pool}"] if features.pool > 1 else []
        return pooled + ([f"trained on {used} of {total} training items{refit}"] if used < total or refit else [])

    return {
        "logistic_regression": Baseline("logistic_regression", lr_params, lr_score, lr_grid, lr,
                                        lr_torch(lr, features, num_classes), len(y), len(yv), notes(len(y))),
        "rbf_svc": Baseline("rbf_svc", svc_params, svc_score, svc_grid, svc, svc_module, len(svc_rows), len(yv),
                            notes(len(svc_rows))),
    }  # fmt: skip


def fit_features(images: np.ndarray) -> PixelFeatures:
    """`PixelFeatures` standardized with these (training) items' per-feature mean and std."""
    pool = pool_factor(*images.shape[1:3])
    raw = run_module(PixelFeatures(pool, torch.zeros(1), torch.ones(1)), images)
    std = raw.std(axis=0)
    return PixelFeatures(pool, torch.from_numpy(raw.mean(axis=0)), torch.from_numpy(np.where(std > 0, std, 1.0)))


def lr_torch(estimator: LogisticRegression, features: PixelFeatures, num_classes: int) -> LogisticBaseline:
    """The fitted logistic regression as softmax(W @ features + b). Two classes: scikit-learn keeps
    one row z (class 1), and [1 - sigmoid(z), sigmoid(z)] = softmax([0, z])."""
    weight, bias = torch.from_numpy(estimator.coef_), torch.from_numpy(estimator.intercept_)
    if num_classes == 2:
        weight, bias = torch.cat([torch.zeros_like(weight), weight]), torch.cat([torch.zeros_like(bias), bias])
    return LogisticBaseline(features, weight, bias).eval()


def svc_torch(estimator: SVC, features: PixelFeatures, num_classes: int, temperature: float = 1.0) -> RbfSvcBaseline:
    """The fitted SVC's decision function in torch. libsvm's layout: for the pair (i, j), i < j, the
    support vectors of class i weigh in with dual_coef_[j - 1], those of class j with dual_coef_[i];
    a positive value votes for i (scikit-learn's `_ovr_decision_function`). Two classes: one pair,
    positive for class 1, as scikit-learn's sign flip gives it."""
    starts = np.concatenate([[0], np.cumsum(estimator.n_support_)])
    pairs = [(i, j) for i in range(num_classes) for j in range(i + 1, num_classes)]
    coef = np.zeros((len(estimator.support_vectors_), len(pairs)))
    first, second = np.zeros((len(pairs), num_classes)), np.zeros((len(pairs), num_classes))
    for p, (i, j) in enumerate(pairs):
        coef[starts[i] : starts[i + 1], p] = estimator.dual_coef_[j - 1, starts[i] : starts[i + 1]]
        coef[starts[j] : starts[j + 1], p] = estimator.dual_coef_[i, starts[j] : starts[j + 1]]
        first[p, i], second[p, j] = 1, 1
    tensors = [estimator.support_vectors_, np.array(estimator.gamma), coef, estimator.intercept_, first, second,
               np.array(temperature)]  # fmt: skip
    return RbfSvcBaseline(features, *(torch.from_numpy(np.asarray(t, dtype=np.float64)) for t in tensors)).eval()


def svc_labels(decision: torch.Tensor) -> np.ndarray:
    """scikit-learn's SVC `predict` from its decision function: > 0 is class 1 (two classes), else
    the argmax (what `break_ties=True` predicts)."""
    return (decision > 0).long().numpy() if decision.dim() == 1 else decision.argmax(dim=1).numpy()


def choose_temperature(decision: np.ndarray, y: np.ndarray) -> float:
    """The temperature T in TEMPERATURES with the least log loss of softmax(decision / T) on these
    (validation) items; `decision` is (N,) for two classes, else (N, classes)."""
    logits = np.stack([np.zeros_like(decision), decision], axis=1) if decision.ndim == 1 else decision
    losses = []
    for t in TEMPERATURES:
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        losses.append(float((np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]).mean()))
    return float(TEMPERATURES[int(np.argmin(losses))])


def check_parity(baseline: Baseline, images: np.ndarray, tolerance: float = 1e-6) -> dict[str, Any]:
    """Does the torch module reproduce scikit-learn on these items? Hard labels (the argmax of the
    module's float32 probabilities) must agree on every item but exact float32 ties, and the
    probabilities (LR) or decision values (SVC) within `tolerance`. Raises MlpipeError
    otherwise, so a module that is not the fitted model is never scored or registered."""
    x = run_module(baseline.module.features, images)
    expected_labels = baseline.estimator.predict(x)
    if baseline.name == "logistic_regression":
        got, expected = run_module(baseline.module, images), baseline.estimator.predict_proba(x)
        got = got[:, baseline.estimator.classes_]
    else:
        got, expected = run_module(baseline.module, images, "decision"), baseline.estimator.decision_function(x)
    proba = run_module(baseline.module, images)
    top2 = np.sort(proba, axis=1)[:, -2:] if len(images) else np.zeros((0, 2))
    tied = top2[:, 0] == top2[:, 1]  # equal at float32: the argmax is arbitrary there, not wrong
    disagree = int(((proba.argmax(axis=1) != expected_labels) & ~tied).sum())
    diff = float(np.abs(got - expected).max()) if len(images) else 0.0
    if disagree or diff > tolerance:
        raise MlpipeError(f"baseline {baseline.name}: the torch module differs from scikit-learn on {disagree} of "
                          f"{len(images)} items (max abs diff {diff:.3g}, tolerance {tolerance:g})")  # fmt: skip
    return {"items": len(images), "labels_agree": True, "float32_ties": int(tied.sum()), "max_abs_diff": diff,
            "tolerance": tolerance}


def checkpoint(module: nn.Module, in_channels: int, num_classes: int) -> dict[str, Any]:
    """A baseline's checkpoint: tensors and plain values only (loads with `weights_only=True`)."""
    return {"kind": "baseline", "model": module.kind, "in_channels": in_channels, "num_classes": num_classes,
            "pool": module.features.pool, "state": {k: v.clone() for k, v in module.state_dict().items()}}  # fmt: skip


def from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild a baseline module from `checkpoint`'s dict. Raises MlpipeError for an unknown model."""
    state = ckpt["state"]
    features = PixelFeatures(ckpt["pool"], state["features.mean"], state["features.std"])
    if ckpt["model"] == "logistic_regression":
        module = LogisticBaseline(features, state["weight"], state["bias"])
    elif ckpt["model"] == "rbf_svc":
        names = ("support", "gamma", "coef", "intercept", "first", "second", "temperature")
        module = RbfSvcBaseline(features, *(state[k] for k in names))
    else:
        raise MlpipeError(f"baseline checkpoint names an unknown model '{ckpt['model']}' (known: {', '.join(NAMES)})")
    module.arch = f"baseline {ckpt['model']}"
    return module.eval()
