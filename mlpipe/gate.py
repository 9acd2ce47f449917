"""The registry gate: does the challenger replace the current `@champion`?

Both models are scored on the same test items (read once, in evaluate). The challenger is
promoted only if it beats the champion on `evaluate.gate_metric` by at least
`evaluate.min_improvement`, a paired bootstrap 95% interval of the difference excludes 0, no
class's recall drops by more than `evaluate.max_recall_drop`, and every absolute threshold in
`evaluate.thresholds` is met. Without a (compatible) champion only the thresholds apply.

With `evaluate.baseline` the challenger must also beat the best classical baseline (chosen on
validation data, see `mlpipe.baseline`), champion or not. The check "beats baseline NAME on
METRIC (paired bootstrap)" passes only if the challenger's METRIC on the full test set is above
the baseline's (strictly) and the challenger is strictly ahead in at least half of the paired
bootstrap resamples (the same resamples as the champion comparison). Its value records the
difference, its paired bootstrap 95% interval and that share.
"""

from __future__ import annotations

import numpy as np

from mlpipe.config import EvaluateConfig
from mlpipe.metrics import bootstrap_indices, fast_scores


def paired_difference(y: np.ndarray, mine: np.ndarray, theirs: np.ndarray, k: int, metric: str,
                      idx: np.ndarray) -> dict:  # fmt: skip
    """`metric` of predictions `mine` minus that of `theirs` on the test items `y`: on the full set
    (`difference`), its 95% interval over the paired bootstrap resamples `idx` (`ci95`, percentile)
    and the share of resamples where `mine` is strictly ahead (`share_ahead`)."""
    full = fast_scores(y[None], mine[None], k)[metric][0] - fast_scores(y[None], theirs[None], k)[metric][0]
    paired = fast_scores(y[idx], mine[idx], k)[metric] - fast_scores(y[idx], theirs[idx], k)[metric]
    low, high = (float(np.percentile(paired, q)) for q in (2.5, 97.5))
    return {"difference": float(full), "ci95": [low, high], "share_ahead": float((paired > 0).mean())}


def baseline_check_name(name: str, metric: str) -> str:
    return f"beats baseline {name} on {metric} (paired bootstrap)"


def decide(
    y: np.ndarray, challenger: np.ndarray, champion: np.ndarray | None, names: list[str], config: EvaluateConfig,
    champion_note: str | None = None, baseline: tuple[str, np.ndarray] | None = None,
) -> dict:  # fmt: skip
    """`challenger` and `champion` are predicted class indices for the test items `y`; `baseline`,
    if given, is (name, predicted class indices) of the best classical baseline on the same items."""
    k = len(names)
    idx = bootstrap_indices(len(y), config.bootstrap_resamples, config.seed)  # the same resamples for every comparison
    mine = {m: float(v[0]) for m, v in fast_scores(y[None], challenger[None], k).items() if m != "recall"}
    checks: dict[str, dict] = {}
    for metric, floor in config.thresholds.items():
        checks[f"threshold {metric} >= {floor}"] = {"passed": mine[metric] >= floor, "value": round(mine[metric], 4)}
    report = {"gate_metric": config.gate_metric, "challenger": mine, "champion": None, "checks": checks}
    if champion is not None:
        theirs = fast_scores(y[None], champion[None], k)
        report["champion"] = {m: float(v[0]) for m, v in theirs.items() if m != "recall"}
        diff = mine[config.gate_metric] - report["champion"][config.gate_metric]
        paired = fast_scores(y[idx], challenger[idx], k)[config.gate_metric] - fast_scores(y[idx], champion[idx], k)[config.gate_metric]
        low, high = (float(np.percentile(paired, q)) for q in (2.5, 97.5))
        checks[f"improvement >= {config.min_improvement}"] = {"passed": diff >= config.min_improvement, "value": round(diff, 4)}
        checks["paired bootstrap 95% CI excludes 0"] = {"passed": low > 0, "value": [round(low, 4), round(high, 4)]}
        drops = theirs["recall"][0] - fast_scores(y[None], challenger[None], k)["recall"][0]
        worst = int(np.nanargmax(drops)) if np.isfinite(drops).any() else 0
        checks[f"no class recall drops by more than {config.max_recall_drop}"] = {
            "passed": bool(np.nan_to_num(drops, nan=0.0).max() <= config.max_recall_drop),
            "value": {"class": names[worst], "drop": round(float(np.nan_to_num(drops[worst])), 4)},
        }
    if baseline is not None:
        versus = paired_difference(y, challenger, baseline[1], k, config.gate_metric, idx)
        checks[baseline_check_name(baseline[0], config.gate_metric)] = {
            "passed": versus["difference"] > 0 and versus["share_ahead"] >= 0.5,
            "value": {"difference": round(versus["difference"], 4), "ci95": [round(v, 4) for v in versus["ci95"]],
                      "share_ahead": round(versus["share_ahead"], 4)},
        }  # fmt: skip
    failed = [name for name, check in checks.items() if not check["passed"]]
    report["decision"] = "promote" if not failed else "reject"
    passed = "all checks passed" if champion is not None else "no champion yet; thresholds met"
    report["reasons"] = failed or [passed + (f"; baseline {baseline[0]} beaten" if baseline is not None else "")]
    if champion_note:
        report["reasons"].append(champion_note)
    return report
