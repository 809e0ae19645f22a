"""Eval stage: BEIR retrieval metrics (pytrec_eval, what BEIR itself uses) for one or more models.

Any BEIR folder works (corpus.jsonl, queries.jsonl, qrels/test.tsv). Documents are embedded as
"title text" (BEIR's convention), everything is L2-normalised, retrieval is exact inner product.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

METRICS = ("ndcg@1", "ndcg@3", "ndcg@5", "ndcg@10", "recall@1", "recall@5", "recall@10", "recall@100",
           "map@10", "mrr@10")
HEADLINE = ("ndcg@1", "ndcg@10", "recall@10", "recall@100", "map@10", "mrr@10")


class BeirFormatError(ValueError):
    pass


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    if not path.exists():
        raise BeirFormatError(f"{path}: missing (a BEIR folder needs corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BeirFormatError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
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


def load_beir(folder: str | Path) -> tuple[list[dict], dict[str, str], dict[str, dict[str, int]]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise BeirFormatError(f"{folder}: not a folder")
    corpus = _read_jsonl(folder / "corpus.jsonl", ("_id", "text"))
    queries = {str(q["_id"]): q["text"] for q in _read_jsonl(folder / "queries.jsonl", ("_id", "text"))}
    qrels = load_qrels(folder / "qrels" / "test.tsv")
    qrels = {q: d for q, d in qrels.items() if q in queries}
    if not qrels:
        raise BeirFormatError(f"{folder}: no query in qrels/test.tsv appears in queries.jsonl")
    return corpus, queries, qrels


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
    from pipeline.encode import encode_parquet
    from pipeline.prep import search

    cache.mkdir(parents=True, exist_ok=True)
    corpus_path = cache / "beir_corpus.parquet"
    pq.write_table(pa.table({"title": [str(d.get("title") or "") for d in corpus],
                             "text": [str(d["text"]) for d in corpus]}), corpus_path)
    query_path = cache / "beir_queries.parquet"
    pq.write_table(pa.table({"query": [queries[q] for q in qids]}), query_path)
    use_ray = len(corpus) > 50_000  # below that, actor start-up costs more than it saves
    doc_emb = encode_parquet(model_path, corpus_path, "passage", cache, batch_size=batch_size, use_ray=use_ray)
    q_emb = encode_parquet(model_path, query_path, "query", cache, batch_size=batch_size)
    scores, idx = search(doc_emb, q_emb, top_k + 1)
    doc_ids = [str(d["_id"]) for d in corpus]
    run: dict[str, dict[str, float]] = {}
    for qi, q in enumerate(qids):
        # BEIR drops a hit whose id equals the query id (ignore_identical_ids=True); so do we.
        hits = {doc_ids[j]: float(s) for j, s in zip(idx[qi], scores[qi]) if j >= 0 and doc_ids[j] != q}
        run[q] = dict(sorted(hits.items(), key=lambda kv: -kv[1])[:top_k])
    return run


def evaluate_models(beir_dir: str | Path, models: dict[str, str], top_k: int, cache: Path,
                    batch_size: int = 64) -> tuple[dict[str, dict], dict[str, dict]]:
    """{label: model_path} -> ({label: mean metrics}, {label: per-query metrics})."""
    corpus, queries, qrels = load_beir(beir_dir)
    qids = sorted(qrels)
    means, per_query = {}, {}
    for label, path in models.items():
        run = retrieve(path, corpus, queries, qids, top_k, cache, batch_size)
        means[label], per_query[label] = compute_metrics(qrels, run)
    return means, per_query


def format_table(means: dict[str, dict], metrics=HEADLINE) -> str:
    labels = list(means)
    head = f"{'metric':<12}" + "".join(f"{lab[:22]:>24}" for lab in labels)
    has_delta = len(labels) == 2
    if has_delta:
        head += f"{'delta':>10}"
    lines = [head, "-" * len(head)]
    for m in metrics:
        line = f"{m:<12}" + "".join(f"{means[lab][m]:>24.4f}" for lab in labels)
        if has_delta:
            line += f"{means[labels[1]][m] - means[labels[0]][m]:>+10.4f}"
        lines.append(line)
    return "\n".join(lines)


def run_stage(cfg, run, rec) -> None:
    from pipeline.models import resolve_embedder

    models = {"base": resolve_embedder(cfg.train.base_model), "fine-tuned": str(run.root / "train" / "model")}
    means, per_query = evaluate_models(run.root / "prep" / "beir_test", models, cfg.eval.top_k,
                                       run.root / "cache" / "eval", cfg.eval.batch_size)
    deltas = {m: round(means["fine-tuned"][m] - means["base"][m], 5) for m in METRICS}
    (rec.dir / "metrics.json").write_text(json.dumps({**means, "delta": deltas}, indent=2))
    table = format_table(means)
    (rec.dir / "report.md").write_text(f"# Retrieval on the synthetic test split\n\n```\n{table}\n```\n")
    print(table)
    rec.manifest.counts = {"queries": len(per_query["base"]), "ndcg@10_base": means["base"]["ndcg@10"],
                           "ndcg@10_fine_tuned": means["fine-tuned"]["ndcg@10"]}
