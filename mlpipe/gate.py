"""The registry gate: does the challenger replace the current `@champion`?

Both models are scored on the same test items (read once, in evaluate). The challenger is
promoted only if it beats the champion on `evaluate.gate_metric` by at least
`evaluate.min_improvement`, a paired bootstrap 95% interval of the difference excludes 0, no
class's recall drops by more than `evaluate.max_recall_drop`, and every absolute threshold in
`evaluate.thresholds` is met. Without a (compatible) champion only the thresholds apply.
"""

from __future__ import annotations

import numpy as np

from mlpipe.config import EvaluateConfig
from mlpipe.metrics import bootstrap_indices, fast_scores


def decide(
    y: np.ndarray, challenger: np.ndarray, champion: np.ndarray | None, names: list[str], config: EvaluateConfig,
    champion_note: str | None = None,
) -> dict:  # fmt: skip
    """`challenger` and `champion` are predicted class indices for the test items `y`."""
    k = len(names)
    mine = {m: float(v[0]) for m, v in fast_scores(y[None], challenger[None], k).items() if m != "recall"}
    checks: dict[str, dict] = {}
    for metric, floor in config.thresholds.items():
        checks[f"threshold {metric} >= {floor}"] = {"passed": mine[metric] >= floor, "value": round(mine[metric], 4)}
    report = {"gate_metric": config.gate_metric, "challenger": mine, "champion": None, "checks": checks}
    if champion is not None:
        theirs = fast_scores(y[None], champion[None], k)
        report["champion"] = {m: float(v[0]) for m, v in theirs.items() if m != "recall"}
        diff = mine[config.gate_metric] - report["champion"][config.gate_metric]
        idx = bootstrap_indices(len(y), config.bootstrap_resamples, config.seed)  # the same resamples for both
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
    failed = [name for name, check in checks.items() if not check["passed"]]
    report["decision"] = "promote" if not failed else "reject"
    report["reasons"] = failed or ["all checks passed" if champion is not None else "no champion yet; thresholds met"]
    if champion_note:
        report["reasons"].append(champion_note)
    return report
