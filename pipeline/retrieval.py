"""Scoring models on a BEIR folder: each model (folder, ONNX export or endpoint) retrieves over the whole
corpus by exact inner product; BM25 and its fusion with the first model come as reference rows."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.beir import BeirData, compute_metrics, load_beir, passage_text
from pipeline.encode import encode_parquet
from pipeline.index import build_index, search
from pipeline.lexical import bm25_run, rrf


def retrieve(model_path: str, corpus: list[dict], queries: dict[str, str], qids: list[str], top_k: int,
             cache: Path, batch_size: int) -> dict[str, dict[str, float]]:
    """Top-k documents per query, scored by cosine, for one model (any spec `make_encoder` takes)."""
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


def chunk_run(model_path: str, chunks_path: Path, queries: dict[str, str], hit_ids: list[str], top_k: int,
              cache: Path, batch_size: int) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    """Top-k hits per query over a run's chunks (corpus/chunks.parquet) by cosine. A chunk's hit is its id in
    `hit_ids` (row order): chunk ids, or document ids (then a document scores its best chunk). Returns the run
    and, per query and hit, the row of the chunk that scored it (the passage a reranker should read)."""
    qids = sorted(queries)
    cache.mkdir(parents=True, exist_ok=True)
    # A folder of this call's own (the cache may be shared); the embeddings are cached by content.
    tables = Path(tempfile.mkdtemp(prefix="chunk-run-", dir=cache))
    try:
        query_path = tables / "queries.parquet"
        pq.write_table(pa.table({"query": [queries[q] for q in qids]}), query_path)
        chunk_emb = encode_parquet(model_path, chunks_path, "passage", cache, batch_size=batch_size)
        query_emb = encode_parquet(model_path, query_path, "query", cache, batch_size=batch_size)
    finally:
        shutil.rmtree(tables, ignore_errors=True)
    index, _ = build_index(chunk_emb, "flat")
    unique = len(set(hit_ids)) == len(hit_ids)
    scores, idx = search(index, query_emb, top_k if unique else 4 * top_k)  # several chunks may share a document
    run, rows = {}, {}
    for qi, q in enumerate(qids):
        best: dict[str, tuple[float, int]] = {}
        for j, s in zip(idx[qi], scores[qi]):
            if j >= 0 and (hit_ids[j] not in best or s > best[hit_ids[j]][0]):
                best[hit_ids[j]] = (float(s), int(j))
        top = sorted(best.items(), key=lambda kv: -kv[1][0])[:top_k]
        run[q] = {hit: s for hit, (s, _) in top}
        rows[q] = {hit: j for hit, (_, j) in top}
    return run, rows


def rerank_run(reranker, run: dict[str, dict[str, float]], passages: dict[str, str], queries: dict[str, str],
               top_k: int) -> dict[str, dict[str, float]]:
    """Each query's first `top_k` hits reordered by the reranker (crossencoder.load_reranker's); hits past `top_k`
    keep the first stage's order below them. Scores become rank-based (one scale for both parts)."""
    out = {}
    for q, hits in run.items():
        ranked = list(hits)  # the run's dicts are in score order
        head, tail = ranked[:top_k], ranked[top_k:]
        if head:
            scores = reranker.score(queries[q], [passages[d] for d in head])
            head = [head[i] for i in sorted(range(len(head)), key=lambda i: -scores[i])]
        order = head + tail
        out[q] = {d: float(len(order) - r) for r, d in enumerate(order)}
    return out


def reranked_label(model: str) -> str:
    return f"{model} + reranker"


@dataclass
class EvalResult:
    data: BeirData
    means: dict[str, dict[str, float]] = field(default_factory=dict)       # model -> metric -> mean
    per_query: dict[str, dict[str, dict]] = field(default_factory=dict)    # model -> qid -> metric -> value
    top_hit: dict[str, dict[str, str]] = field(default_factory=dict)       # model -> qid -> doc id
    references: list[str] = field(default_factory=list)                    # rows that are no model of ours
    runs: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # model -> qid -> doc -> score
    rerank_ms_per_query: float | None = None                                # the reranker's cost, when there is one

    def add(self, label: str, run: dict[str, dict[str, float]]) -> None:
        self.runs[label] = run
        self.means[label], self.per_query[label] = compute_metrics(self.data.qrels, run)
        self.top_hit[label] = {q: next(iter(run[q]), "") for q in run}


BM25_LABEL = "bm25 (reference)"


def hybrid_label(base: str) -> str:
    return f"bm25+{base} RRF (reference)"


def evaluate_models(beir_dir: str | Path, models: dict[str, str], top_k: int, cache: Path,
                    batch_size: int = 64, references: bool = True, reranker: str | None = None,
                    rerank_top_k: int = 100) -> EvalResult:
    """{label: model folder, ONNX export folder or endpoint URL} -> metrics of each on one BEIR folder.

    With `reranker` (a reranker folder), a row follows that reorders the last model's top `rerank_top_k` hits
    with it. With `references`, two rows that need no model of ours follow: BM25, and BM25 fused with the
    first (baseline) model by reciprocal rank."""
    data = load_beir(beir_dir)
    qids = sorted(data.qrels)
    result = EvalResult(data)
    runs = {}
    for label, path in models.items():
        runs[label] = retrieve(path, data.corpus, data.queries, qids, top_k, cache, batch_size)
        result.add(label, runs[label])
    if reranker:
        from pipeline.crossencoder import load_reranker

        last = list(models)[-1]
        passages = {str(d["_id"]): passage_text(str(d.get("title") or ""), str(d["text"])) for d in data.corpus}
        scorer = load_reranker(reranker, batch_size=batch_size)
        t0 = time.perf_counter()
        result.add(reranked_label(last), rerank_run(scorer, runs[last], passages, data.queries, min(rerank_top_k, top_k)))
        result.rerank_ms_per_query = round(1000 * (time.perf_counter() - t0) / max(1, len(qids)), 1)
    if references:
        base = next(iter(models))
        lexical = bm25_run(data.corpus, data.queries, qids, top_k)
        result.add(BM25_LABEL, lexical)
        result.add(hybrid_label(base), rrf([lexical, runs[base]], top_k))
        result.references = [BM25_LABEL, hybrid_label(base)]
    return result
