"""Lexical retrieval (BM25) and reciprocal-rank fusion with a dense run: the reference rows of every
evaluation. They need no model, and a user must see when plain BM25 already beats their dense
embedder (on BEIR SciFact it does: codes, identifiers and jargon are where lexical matching is strong).

BM25 is bm25s (Lucene's scoring, k1 1.5, b 0.75) over "title text" with English stopwords and the
Snowball English stemmer (PyStemmer).
"""

from __future__ import annotations

RRF_K = 60  # the constant of Cormack et al.'s reciprocal-rank fusion


def bm25_run(corpus: list[dict], queries: dict[str, str], qids: list[str], top_k: int) -> dict[str, dict[str, float]]:
    """Top-k documents per query by BM25, in pytrec_eval's run layout ({qid: {doc_id: score}})."""
    import logging

    import bm25s
    import Stemmer

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets DEBUG at import: its lines reached the console
    stemmer = Stemmer.Stemmer("english")
    texts = [f"{d.get('title') or ''} {d['text']}".strip() for d in corpus]
    index = bm25s.BM25()
    index.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    tokens = bm25s.tokenize([queries[q] for q in qids], stopwords="en", stemmer=stemmer, show_progress=False)
    k = min(top_k + 1, len(corpus))
    hits, scores = index.retrieve(tokens, k=k, show_progress=False, n_threads=1)
    doc_ids = [str(d["_id"]) for d in corpus]
    run = {}
    for qi, q in enumerate(qids):
        # BEIR drops a hit whose id equals the query id (ignore_identical_ids=True); so do we.
        ranked = [(doc_ids[j], float(s)) for j, s in zip(hits[qi], scores[qi]) if float(s) > 0 and doc_ids[j] != q]
        run[q] = dict(ranked[:top_k])
    return run


def rrf(runs: list[dict[str, dict[str, float]]], top_k: int, k: int = RRF_K) -> dict[str, dict[str, float]]:
    """Reciprocal-rank fusion: each document scores sum(1 / (k + rank)) over the runs that retrieved it."""
    fused = {}
    for q in runs[0]:
        scores: dict[str, float] = {}
        for run in runs:
            ranked = sorted(run.get(q, {}).items(), key=lambda kv: -kv[1])
            for rank, (doc, _) in enumerate(ranked, start=1):
                scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
        fused[q] = dict(sorted(scores.items(), key=lambda kv: -kv[1])[:top_k])
    return fused
