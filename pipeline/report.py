"""What a sceptic asks of an evaluation: deltas vs base, are they significant, where do they come from.

- `paired_test`: a paired randomisation (sign-flip) test over queries for the p-value, and a paired
  bootstrap for the 95% interval of the mean difference.
- `compare`: absolute values, absolute and relative deltas vs the base model, significance per metric.
  NDCG@10 is the primary metric, tested at 0.05; the others are secondary and their p-values are
  Holm-corrected across them (`p_holm`), so a table of ten metrics does not find a "gain" by chance.
- `verdict`: one plain sentence on the primary metric, saying so when the difference is within noise.
- `by_query_type`: the same means split by query type (identifier queries, questions, claims, ...).
- `plot_metrics`: grouped bar chart, one group per metric, one bar per model.
- `write_report`: metrics.json, report.md (tables, significance, largest wins and losses), metrics.png
  and per_query.parquet for one evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.beir import HEADLINE, METRICS


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


def format_table(means: dict[str, dict], metrics=HEADLINE) -> str:
    """One column per model, each as wide as its label; with two models or more a last column holds the
    second minus the first (fine-tuned - base), and its header says so."""
    labels = list(means)
    columns = labels + ([f"{labels[1]} - {labels[0]}"] if len(labels) >= 2 else [])
    widths = [max(len(c), 8) + 2 for c in columns]
    head = f"{'metric':<12}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths))
    lines = [head, "-" * len(head)]
    for m in metrics:
        values = [means[lab][m] for lab in labels]
        cells = [f"{v:>{w}.4f}" for v, w in zip(values, widths)]
        if len(labels) >= 2:
            cells.append(f"{values[1] - values[0]:>+{widths[-1]}.4f}")
        lines.append(f"{m:<12}" + "".join(cells))
    return "\n".join(lines)


def wins_and_losses(result, base: str, other: str, metric: str = "ndcg@10", n: int = 10):
    """The n queries `other` improved most over `base`, and the n it hurt most, with each top hit."""
    docs = {str(d["_id"]): d for d in result.data.corpus}
    rows = []
    for q, scores in result.per_query[other].items():
        delta = scores[metric] - result.per_query[base][q][metric]
        hit = docs.get(result.top_hit[other][q], {})
        rows.append({"query_id": q, "query": result.data.queries[q], "delta": round(delta, 4),
                     "base_top": result.top_hit[base][q], "top_hit": result.top_hit[other][q],
                     "top_hit_text": " ".join(f"{hit.get('title') or ''} {hit.get('text', '')}".split())[:160]})
    rows.sort(key=lambda r: r["delta"])
    wins = [r for r in reversed(rows) if r["delta"] > 0][:n]
    losses = [r for r in rows if r["delta"] < 0][:n]
    return wins, losses


def write_report(result, out_dir: Path, title: str, base: str = "base", also: tuple = ()) -> dict:
    """metrics.json, report.md, metrics.png and per_query.parquet for base vs every other model
    (`result`: a `retrieval.EvalResult`), and for each (first, second) pair in `also` (a reranked row against
    the embedder it reranked): its comparison goes to metrics.json's "comparisons" and a verdict of its own."""
    comparison = compare(result.per_query, METRICS, base=base)
    breakdown = by_query_type(result.per_query, result.data.query_types, HEADLINE)
    others = [m for m in result.means if m != base]
    models = [m for m in others if m not in result.references]  # ours, not the reference rows
    summary = {**result.means, "comparison": comparison, "by_query_type": breakdown,
               "references": result.references}
    if len(models) == 1:
        summary["delta"] = {m: comparison[models[0]][m]["delta"] for m in METRICS}
    summary["verdicts"] = [verdict(comparison, m, base, len(result.data.qrels)) for m in models]
    pairs = [(base, other, comparison) for other in others]
    for first, second in also:
        pair = compare({first: result.per_query[first], second: result.per_query[second]}, METRICS, base=first)
        summary.setdefault("comparisons", {})[f"{second} vs {first}"] = pair[second]
        summary["verdicts"].append(verdict(pair, second, first, len(result.data.qrels)))
        pairs.append((first, second, pair))
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    plot_metrics(result.means, HEADLINE, out_dir / "metrics.png", title)

    rows = [{"query_id": q, "query": result.data.queries[q], "query_type": result.data.query_types.get(q, "all"),
             "model": model, "top_hit": result.top_hit[model][q], **scores}
            for model, table in result.per_query.items() for q, scores in table.items()]
    pq.write_table(pa.Table.from_pylist(rows), out_dir / "per_query.parquet")

    lines = [f"# {title}", "", f"{len(result.data.qrels)} queries, {len(result.data.corpus)} documents.", "",
             "```", format_table(result.means), "```", "", *summary["verdicts"], ""]
    if result.references:
        lines += [f"Reference rows, no model of ours: {', '.join(result.references)}. When BM25 or the fusion beats "
                  "the dense models, lexical matching carries this task. On synthetic queries BM25 is flattered "
                  "(generated queries copy their chunk's words); on people's queries it is not.", ""]
    for first, other, table in pairs:
        lines += [f"## {other} vs {first}: paired randomisation test over queries", "",
                  "NDCG@10 is the primary metric (p at 0.05); the others are Holm-corrected across metrics "
                  "(p Holm), and their significance is read from the corrected value.", "",
                  f"| metric | {first} | {other} | delta | relative | 95% CI | p | p Holm | significant |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m in METRICS:
            c = table[other][m]
            rel = f"{c['rel_delta']:+.1%}" if c["rel_delta"] is not None else "n/a"
            holm_p = f"{c['p_holm']:.4f}" if "p_holm" in c else "(primary)"
            lines.append(f"| {m} | {table[first][m]['value']:.4f} | {c['value']:.4f} | {c['delta']:+.4f} | "
                         f"{rel} | [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | {c['p_value']:.4f} | {holm_p} | "
                         f"{'yes' if c['significant'] else 'no'} |")
        lines.append("")
    lines += ["## By query type", "", "| type | queries | model | " + " | ".join(HEADLINE) + " |",
              "|---|---|---|" + "---|" * len(HEADLINE)]
    for t, group in breakdown.items():
        for model in result.means:
            lines.append(f"| {t} | {group['queries']} | {model} | "
                         + " | ".join(f"{group[model][m]:.4f}" for m in HEADLINE) + " |")
    lines.append("")
    for other in models:
        wins, losses = wins_and_losses(result, base, other)
        for name, rows_ in (("wins", wins), ("losses", losses)):
            lines += [f"## Largest {name} of {other} (NDCG@10 delta)", ""]
            lines += [f"- {r['delta']:+.3f} `{r['query']}` -> top hit `{r['top_hit']}`: {r['top_hit_text']}"
                      for r in rows_] or ["- none"]
            lines.append("")
    (out_dir / "report.md").write_text("\n".join(lines))
    return summary


def print_wins_and_losses(result, base: str, other: str) -> None:
    wins, losses = wins_and_losses(result, base, other)
    for name, rows in (("wins", wins), ("losses", losses)):
        if not rows:  # no heading over nothing
            continue
        print(f"\nLargest {name} of {other} over {base} (NDCG@10):")
        for r in rows:
            print(f"  {r['delta']:+.3f}  {r['query'][:70]!r} -> {r['top_hit_text'][:70]!r}")
