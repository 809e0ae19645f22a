"""Eval stage: BEIR retrieval metrics (pytrec_eval, what BEIR itself uses) for one or more models.

Any BEIR folder works (corpus.jsonl, queries.jsonl, qrels/test.tsv). Documents are embedded as
"title text" (BEIR's convention), everything is L2-normalised, retrieval is exact inner product.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import RetrofitError

METRICS = ("ndcg@1", "ndcg@3", "ndcg@5", "ndcg@10", "recall@1", "recall@5", "recall@10", "recall@100",
           "map@10", "mrr@10")
HEADLINE = ("ndcg@1", "ndcg@10", "recall@10", "recall@100", "map@10", "mrr@10")


class BeirFormatError(RetrofitError):
    pass


def json_lines(path: Path, invalid) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line; `invalid(lineno, message)` makes the
    exception raised for a line that is not JSON, so each caller names the file its own way."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise invalid(lineno, e.msg) from None


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    if not path.exists():
        raise BeirFormatError(f"{path}: missing (a BEIR folder needs corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    rows = []
    for lineno, row in json_lines(path, lambda n, msg: BeirFormatError(f"{path}:{n}: invalid JSON ({msg})")):
        missing = [k for k in required if k not in row]
        if missing:
            raise BeirFormatError(f"{path}:{lineno}: missing field(s) {missing}")
        rows.append(row)
    if not rows:
        raise BeirFormatError(f"{path}: empty")
    return rows


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    if not path.exists():
        raise BeirFormatError(f"{path}: missing (a BEIR folder needs qrels/test.tsv)")
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if lineno == 1 and parts[0] == "query-id":
                continue
            if not line.strip():
                continue
            if len(parts) != 3:
                raise BeirFormatError(f"{path}:{lineno}: expected 3 tab-separated fields, got {len(parts)}")
            try:
                qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
            except ValueError:
                raise BeirFormatError(f"{path}:{lineno}: score {parts[2]!r} is not an integer") from None
    if not qrels:
        raise BeirFormatError(f"{path}: no judgements")
    return qrels


@dataclass
class BeirData:
    corpus: list[dict]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    query_types: dict[str, str]  # from queries.jsonl's optional `query_type` field


def load_beir(folder: str | Path) -> BeirData:
    folder = Path(folder)
    if not folder.is_dir():
        raise BeirFormatError(f"{folder}: not a folder")
    corpus = _read_jsonl(folder / "corpus.jsonl", ("_id", "text"))
    query_rows = _read_jsonl(folder / "queries.jsonl", ("_id", "text"))
    queries = {str(q["_id"]): q["text"] for q in query_rows}
    qrels = load_qrels(folder / "qrels" / "test.tsv")
    qrels = {q: d for q, d in qrels.items() if q in queries}
    if not qrels:
        raise BeirFormatError(f"{folder}: no query in qrels/test.tsv appears in queries.jsonl")
    types = {str(q["_id"]): str(q.get("query_type") or "all") for q in query_rows if str(q["_id"]) in qrels}
    return BeirData(corpus, queries, qrels, types)


def compute_metrics(qrels: dict, run: dict) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean and per-query metrics with pytrec_eval (MRR@10 from the run cut at 10, as BEIR does)."""
    import pytrec_eval

    measures = {"ndcg_cut.1,3,5,10", "recall.1,5,10,100", "map_cut.10"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    top10 = {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:10]) for q, docs in run.items()}
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    names = {"ndcg@1": "ndcg_cut_1", "ndcg@3": "ndcg_cut_3", "ndcg@5": "ndcg_cut_5", "ndcg@10": "ndcg_cut_10",
             "recall@1": "recall_1", "recall@5": "recall_5", "recall@10": "recall_10",
             "recall@100": "recall_100", "map@10": "map_cut_10"}
    table = {q: {m: per_query[q][k] for m, k in names.items()} for q in per_query}
    for q in table:
        table[q]["mrr@10"] = mrr.get(q, {}).get("recip_rank", 0.0)
    mean = {m: round(float(np.mean([table[q][m] for q in table])), 5) for m in METRICS}
    return mean, table


def retrieve(model_path: str, corpus: list[dict], queries: dict[str, str], qids: list[str], top_k: int,
             cache: Path, batch_size: int) -> dict[str, dict[str, float]]:
    """Top-k documents per query, scored by cosine, for one model (any spec `make_encoder` takes)."""
    from pipeline.encode import encode_parquet
    from pipeline.prep import build_index, search

    cache.mkdir(parents=True, exist_ok=True)
    # The texts go to a folder of this call's own (the cache may be shared by evaluations running at
    # once); the embeddings are cached by content, whatever the file's name.
    tables = Path(tempfile.mkdtemp(prefix="beir-", dir=cache))
    try:
        corpus_path = tables / "corpus.parquet"
        pq.write_table(pa.table({"title": [str(d.get("title") or "") for d in corpus],
                                 "text": [str(d["text"]) for d in corpus]}), corpus_path)
        query_path = tables / "queries.parquet"
        pq.write_table(pa.table({"query": [queries[q] for q in qids]}), query_path)
        use_ray = len(corpus) > 50_000  # below that, actor start-up costs more than it saves
        doc_emb = encode_parquet(model_path, corpus_path, "passage", cache, batch_size=batch_size, use_ray=use_ray)
        q_emb = encode_parquet(model_path, query_path, "query", cache, batch_size=batch_size)
    finally:
        shutil.rmtree(tables, ignore_errors=True)
    index, _ = build_index(doc_emb, "flat")  # evaluation is always exact search
    scores, idx = search(index, q_emb, top_k + 1)
    doc_ids = [str(d["_id"]) for d in corpus]
    run: dict[str, dict[str, float]] = {}
    for qi, q in enumerate(qids):
        # BEIR drops a hit whose id equals the query id (ignore_identical_ids=True); so do we.
        hits = {doc_ids[j]: float(s) for j, s in zip(idx[qi], scores[qi]) if j >= 0 and doc_ids[j] != q}
        run[q] = dict(sorted(hits.items(), key=lambda kv: -kv[1])[:top_k])
    return run


@dataclass
class EvalResult:
    data: BeirData
    means: dict[str, dict[str, float]] = field(default_factory=dict)       # model -> metric -> mean
    per_query: dict[str, dict[str, dict]] = field(default_factory=dict)    # model -> qid -> metric -> value
    top_hit: dict[str, dict[str, str]] = field(default_factory=dict)       # model -> qid -> doc id
    references: list[str] = field(default_factory=list)                    # rows that are no model of ours

    def add(self, label: str, run: dict[str, dict[str, float]]) -> None:
        self.means[label], self.per_query[label] = compute_metrics(self.data.qrels, run)
        self.top_hit[label] = {q: next(iter(run[q]), "") for q in run}


BM25_LABEL = "bm25 (reference)"


def hybrid_label(base: str) -> str:
    return f"bm25+{base} RRF (reference)"


def evaluate_models(beir_dir: str | Path, models: dict[str, str], top_k: int, cache: Path,
                    batch_size: int = 64, references: bool = True) -> EvalResult:
    """{label: model folder, ONNX export folder or endpoint URL} -> metrics of each on one BEIR folder.

    With `references`, two rows that need no model of ours follow: BM25, and BM25 fused with the first
    (baseline) model by reciprocal rank."""
    from pipeline.lexical import bm25_run, rrf

    data = load_beir(beir_dir)
    qids = sorted(data.qrels)
    result = EvalResult(data)
    runs = {}
    for label, path in models.items():
        runs[label] = retrieve(path, data.corpus, data.queries, qids, top_k, cache, batch_size)
        result.add(label, runs[label])
    if references:
        base = next(iter(models))
        lexical = bm25_run(data.corpus, data.queries, qids, top_k)
        result.add(BM25_LABEL, lexical)
        result.add(hybrid_label(base), rrf([lexical, runs[base]], top_k))
        result.references = [BM25_LABEL, hybrid_label(base)]
    return result


def format_table(means: dict[str, dict], metrics=HEADLINE) -> str:
    labels = list(means)
    head = f"{'metric':<12}" + "".join(f"{lab[:22]:>24}" for lab in labels)
    has_delta = len(labels) >= 2  # the second row (fine-tuned) minus the first (base)
    if has_delta:
        head += f"{'delta':>10}"
    lines = [head, "-" * len(head)]
    for m in metrics:
        line = f"{m:<12}" + "".join(f"{means[lab][m]:>24.4f}" for lab in labels)
        if has_delta:
            line += f"{means[labels[1]][m] - means[labels[0]][m]:>+10.4f}"
        lines.append(line)
    return "\n".join(lines)


def wins_and_losses(result: EvalResult, base: str, other: str, metric: str = "ndcg@10", n: int = 10):
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


def write_report(result: EvalResult, out_dir: Path, title: str, base: str = "base") -> dict:
    """metrics.json, report.md, metrics.png and per_query.parquet for base vs every other model."""
    from pipeline.report import by_query_type, compare, plot_metrics, verdict

    comparison = compare(result.per_query, METRICS, base=base)
    breakdown = by_query_type(result.per_query, result.data.query_types, HEADLINE)
    others = [m for m in result.means if m != base]
    models = [m for m in others if m not in result.references]  # ours, not the reference rows
    summary = {**result.means, "comparison": comparison, "by_query_type": breakdown,
               "references": result.references}
    if len(models) == 1:
        summary["delta"] = {m: comparison[models[0]][m]["delta"] for m in METRICS}
    summary["verdicts"] = [verdict(comparison, m, base, len(result.data.qrels)) for m in models]
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
    for other in others:
        lines += [f"## {other} vs {base}: paired randomisation test over queries", "",
                  "NDCG@10 is the primary metric (p at 0.05); the others are Holm-corrected across metrics "
                  "(p Holm), and their significance is read from the corrected value.", "",
                  "| metric | base | " + other + " | delta | relative | 95% CI | p | p Holm | significant |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m in METRICS:
            c = comparison[other][m]
            rel = f"{c['rel_delta']:+.1%}" if c["rel_delta"] is not None else "n/a"
            holm_p = f"{c['p_holm']:.4f}" if "p_holm" in c else "(primary)"
            lines.append(f"| {m} | {comparison[base][m]['value']:.4f} | {c['value']:.4f} | {c['delta']:+.4f} | "
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


def print_wins_and_losses(result: EvalResult, base: str, other: str) -> None:
    wins, losses = wins_and_losses(result, base, other)
    for name, rows in (("wins", wins), ("losses", losses)):
        print(f"\nLargest {name} of {other} over {base} (NDCG@10):")
        for r in rows:
            print(f"  {r['delta']:+.3f}  {r['query'][:70]!r} -> {r['top_hit_text'][:70]!r}")


def run_stage(cfg, run, rec) -> None:
    from pipeline.models import resolve_embedder

    models = {"base": resolve_embedder(cfg.train.base_model), "fine-tuned": str(run.root / "merge" / "model")}
    result = evaluate_models(run.root / "prep" / "beir_test", models, cfg.eval.top_k,
                             run.root / "cache" / "eval", cfg.eval.batch_size)
    weight = run.require("merge", "eval").counts["weight"]
    shipped = "" if weight == 1 else f" ('fine-tuned' is the shipped model: {weight:g} x fine-tuned + {1 - weight:g} x base)"
    summary = write_report(result, rec.dir, "Retrieval on the synthetic test split" + shipped)
    print(format_table(result.means))
    print(*summary["verdicts"], sep="\n")
    print_wins_and_losses(result, "base", "fine-tuned")
    sig = summary["comparison"]["fine-tuned"]["ndcg@10"]
    rec.manifest.counts = {"queries": len(result.data.qrels), "ndcg@10_base": result.means["base"]["ndcg@10"],
                           "ndcg@10_fine_tuned": result.means["fine-tuned"]["ndcg@10"],
                           "ndcg@10_p_value": sig["p_value"],
                           "ndcg@10_references": {r: result.means[r]["ndcg@10"] for r in result.references}}
