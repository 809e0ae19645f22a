"""What a sceptic asks of an evaluation: deltas vs base, are they significant, where do they come from.

- `paired_test`: a paired randomisation (sign-flip) test over queries for the p-value, and a paired
  bootstrap for the 95% interval of the mean difference.
- `compare`: absolute values, absolute and relative deltas vs the base model, significance per metric.
  NDCG@10 is the primary metric, tested at 0.05; the others are secondary and their p-values are
  Holm-corrected across them (`p_holm`), so a table of ten metrics does not find a "gain" by chance.
- `verdict`: one plain sentence on the primary metric, saying so when the difference is within noise.
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


PRIMARY = "ndcg@10"


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    adjusted, running = {}, 0.0
    ordered = sorted(p_values.items(), key=lambda kv: kv[1])
    for i, (name, p) in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - i) * p))
        adjusted[name] = running
    return adjusted


def compare(per_query: dict[str, dict[str, dict[str, float]]], metrics, base: str = "base") -> dict:
    """{model: {metric: {value, delta, rel_delta, ci95, p_value, p_holm, significant}}} against `base`.

    `significant` uses the raw p-value for the primary metric (NDCG@10) and the Holm-corrected one for
    every other metric."""
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
        secondary = {m: out[model][m]["p_value"] for m in metrics if m != PRIMARY and "p_value" in out[model][m]}
        for m, p in holm(secondary).items():
            out[model][m]["p_holm"] = round(p, 5)
            out[model][m]["significant"] = p < 0.05
    return out


def verdict(comparison: dict, model: str, base: str, n_queries: int, metric: str = PRIMARY) -> str:
    """One sentence a user can act on: better, worse, or within noise, with the interval and p-value."""
    c, b = comparison[model][metric], comparison[base][metric]
    figures = (f"{metric.upper()} {b['value']:.4f} -> {c['value']:.4f} ({c['delta']:+.4f}, "
               f"95% CI [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}], p {c['p_value']:.3f}, {n_queries} queries)")
    if not c["significant"]:
        return (f"{model} vs {base}: {figures}: within noise. This test set cannot tell the two apart; "
                "do not read the difference as a gain or a loss.")
    return f"{model} vs {base}: {figures}: {model} is {'better' if c['delta'] > 0 else 'WORSE'}."


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
