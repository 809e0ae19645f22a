"""What a sceptic asks of an evaluation: deltas vs base, are they significant, where do they come from.

- `paired_test`: a paired randomisation (sign-flip) test over queries for the p-value, and a paired
  bootstrap for the 95% interval of the mean difference.
- `compare`: absolute values, absolute and relative deltas vs the base model, significance per metric.
- `by_query_type`: the same means split by query type (identifier queries, questions, claims, ...).
- `plot_metrics`: grouped bar chart, one group per metric, one bar per model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def paired_test(base: np.ndarray, other: np.ndarray, n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Two-sided paired randomisation test and bootstrap 95% interval of mean(other - base)."""
    diff = np.asarray(other, np.float64) - np.asarray(base, np.float64)
    n = len(diff)
    observed = float(diff.mean()) if n else 0.0
    if n == 0 or np.allclose(diff, 0):
        return {"delta": observed, "ci95": [0.0, 0.0], "p_value": 1.0, "significant": False}
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(n_resamples, n))
    flipped = np.abs((signs * diff).mean(axis=1))
    # +1 smoothing: the observed assignment is one of the permutations (never report p = 0).
    p = float((np.sum(flipped >= abs(observed) - 1e-12) + 1) / (n_resamples + 1))
    boot = diff[rng.integers(0, n, size=(n_resamples, n))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"delta": observed, "ci95": [float(lo), float(hi)], "p_value": p, "significant": p < 0.05}


def compare(per_query: dict[str, dict[str, dict[str, float]]], metrics, base: str = "base") -> dict:
    """{model: {metric: {value, delta, rel_delta, ci95, p_value, significant}}} against `base`."""
    qids = sorted(per_query[base])
    out = {}
    for model, table in per_query.items():
        out[model] = {}
        for m in metrics:
            values = np.array([table[q][m] for q in qids])
            entry = {"value": round(float(values.mean()), 5)}
            if model != base:
                base_values = np.array([per_query[base][q][m] for q in qids])
                test = paired_test(base_values, values)
                base_mean = float(base_values.mean())
                entry.update({"delta": round(test["delta"], 5),
                              "rel_delta": round(test["delta"] / base_mean, 5) if base_mean else None,
                              "ci95": [round(x, 5) for x in test["ci95"]], "p_value": round(test["p_value"], 5),
                              "significant": test["significant"]})
            out[model][m] = entry
    return out


def by_query_type(per_query: dict, query_types: dict[str, str], metrics) -> dict:
    """{query_type: {model: {metric: mean}, 'queries': n}}"""
    groups: dict[str, list[str]] = {}
    for q, t in query_types.items():
        groups.setdefault(t or "unknown", []).append(q)
    out = {}
    for t, qids in sorted(groups.items()):
        qids = [q for q in qids if q in next(iter(per_query.values()))]
        if not qids:
            continue
        out[t] = {"queries": len(qids)}
        for model, table in per_query.items():
            out[t][model] = {m: round(float(np.mean([table[q][m] for q in qids])), 5) for m in metrics}
    return out


def plot_metrics(means: dict[str, dict[str, float]], metrics, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    models = list(means)
    x = np.arange(len(metrics))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(metrics)), 4.5))
    for i, model in enumerate(models):
        values = [means[model][m] for m in metrics]
        bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, values, width, label=model)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(x, metrics)
    ax.set_ylim(0, min(1.05, max(max(v.values()) for v in means.values()) * 1.15 + 0.02))
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
