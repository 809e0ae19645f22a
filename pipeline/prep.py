"""Prep stage: split QA pairs by document and mine hard negatives with the base embedder + FAISS.

- Split: documents (not QA pairs) are assigned to train/val/test with a seeded shuffle, so no document
  feeds two splits and test chunks never appear in a training row, as positive or as negative.
- Mining: chunks and queries are embedded with the mining model; FAISS returns each query's nearest
  chunks; candidates that are the positive, come from the positive's document, score above
  `margin x positive score` (likely false negatives) or belong to the test split are dropped.
- The test split is also written in BEIR format (corpus = every chunk) for any BEIR tool to check.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SPLIT_SCHEMA = pa.schema([
    ("qa_id", pa.string()), ("query", pa.string()), ("query_type", pa.string()),
    ("positive_id", pa.string()), ("positive_doc_id", pa.string()), ("positive_text", pa.string()),
    ("positive_score", pa.float32()), ("negative_ids", pa.list_(pa.string())),
    ("negative_texts", pa.list_(pa.string())), ("negative_scores", pa.list_(pa.float32())),
])


def split_documents(doc_ids: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """doc_id -> 'train' | 'val' | 'test'. Sorted first, so the split depends only on ids and seed."""
    docs = sorted(set(doc_ids))
    random.Random(seed).shuffle(docs)
    n = len(docs)
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    # A tiny corpus still gets one test and one val document when asked for, and keeps one for training.
    if test_fraction > 0 and n >= 3:
        n_test = max(1, n_test)
    if val_fraction > 0 and n >= 3:
        n_val = max(1, n_val)
    n_test, n_val = min(n_test, max(0, n - 1)), min(n_val, max(0, n - 1 - n_test))
    split = {d: "test" for d in docs[:n_test]}
    split.update({d: "val" for d in docs[n_test:n_test + n_val]})
    split.update({d: "train" for d in docs[n_test + n_val:]})
    return split


def search(chunk_emb: np.ndarray, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search (embeddings are normalised, so scores are cosines)."""
    import faiss

    index = faiss.IndexFlatIP(chunk_emb.shape[1])
    index.add(chunk_emb)
    return index.search(query_emb, min(k, chunk_emb.shape[0]))


def mine_negatives(qa: list[dict], chunk_ids: list[str], chunk_docs: list[str], chunk_emb: np.ndarray,
                   query_emb: np.ndarray, *, candidates: int, margin: float, skip_top: int,
                   num_negatives: int, banned_docs: set[str], stats: dict, depth: int = 0) -> list[dict]:
    """For each QA row, the hard negatives that survive the false-negative filters, and the rank of its
    positive among the `depth` (at least candidates) nearest chunks (-1: further down)."""
    pos_index = {cid: i for i, cid in enumerate(chunk_ids)}
    scores, idx = search(chunk_emb, query_emb, max(candidates + skip_top + 1, depth))
    out, dropped_scores = [], []
    for r, row in enumerate(qa):
        p = pos_index[row["chunk_id"]]
        pos_score = float(query_emb[r] @ chunk_emb[p])
        negs, neg_scores = [], []
        ranked = [(int(j), float(s)) for j, s in zip(idx[r], scores[r]) if j >= 0]
        positive_rank = next((k for k, (j, _) in enumerate(ranked) if j == p), -1)
        for rank, (j, s) in enumerate(ranked[:candidates + skip_top + 1]):
            if j == p:
                continue
            if rank < skip_top:
                stats["skipped_top"] += 1
            elif chunk_docs[j] == row["doc_id"]:
                stats["same_document"] += 1
            elif chunk_docs[j] in banned_docs:
                stats["held_out_document"] += 1
            elif s > margin * pos_score:
                stats["above_margin"] += 1
                dropped_scores.append(s)
            elif len(negs) < num_negatives:
                negs.append(j)
                neg_scores.append(s)
        stats["kept"] += len(negs)
        out.append({"positive": p, "positive_score": pos_score, "positive_rank": positive_rank,
                    "negatives": negs, "negative_scores": neg_scores})
    stats["scores"] = {"positive": quantiles([m["positive_score"] for m in out]),
                       "kept_negative": quantiles([s for m in out for s in m["negative_scores"]]),
                       "dropped_above_margin": quantiles(dropped_scores)}
    return out


def roundtrip_filter(qa: list[dict], mined: list[dict], top_k: int) -> tuple[list[dict], list[dict], dict]:
    """Keep a query only if the mining model ranks its source chunk in the top k: drops queries that
    do not describe their chunk (meta replies such as "The claim is not supported", copied examples)."""
    if top_k <= 0:
        return qa, mined, {"top_k": 0, "in": len(qa), "out": len(qa)}
    kept = [(row, m) for row, m in zip(qa, mined) if 0 <= m["positive_rank"] < top_k]
    examples = [row["query"] for row, m in zip(qa, mined) if not 0 <= m["positive_rank"] < top_k][:5]
    summary = {"top_k": top_k, "in": len(qa), "out": len(kept), "dropped_examples": examples}
    print(f"[prep] round-trip filter (source chunk in the top {top_k}): kept {len(kept)} of {len(qa)} queries",
          flush=True)
    return [r for r, _ in kept], [m for _, m in kept], summary


def quantiles(values: list[float]) -> dict:
    """Where a score distribution sits (for the manifest): count, mean and 10/50/90th percentiles."""
    if not values:
        return {"n": 0}
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return {"n": len(values), "mean": round(float(np.mean(values)), 4), "p10": round(float(p10), 4),
            "p50": round(float(p50), 4), "p90": round(float(p90), 4)}


def eval_set_folder(cfg, chunks_path: Path) -> Path | None:
    """Where this corpus's fixed evaluation set lives (keyed by the chunks' fingerprint), or None if off."""
    if not cfg.prep.fixed_eval_set:
        return None
    from pipeline.models import cache_dir
    from pipeline.rundir import tree_fingerprint

    root = Path(cfg.prep.eval_set_root) if cfg.prep.eval_set_root else cache_dir() / "eval_sets"
    return root / tree_fingerprint(chunks_path)


def freeze_eval_set(folder: Path, split_of: dict[str, str], test_rows: list[dict]) -> None:
    """Keep the document split and the test queries for later runs on the same corpus."""
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "split.json").write_text(json.dumps(split_of))
    pq.write_table(pa.Table.from_pylist(test_rows, SPLIT_SCHEMA), tmp / "test.parquet")
    if not folder.exists():
        tmp.rename(folder)


def write_beir(out_dir: Path, chunks: pa.Table, test_rows: list[dict]) -> None:
    """BEIR layout: corpus.jsonl (every chunk), queries.jsonl and qrels/test.tsv (test split)."""
    (out_dir / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out_dir / "corpus.jsonl", "w", encoding="utf-8") as f:
        for c in chunks.select(["chunk_id", "title", "text"]).to_pylist():
            f.write(json.dumps({"_id": c["chunk_id"], "title": c["title"], "text": c["text"]}) + "\n")
    with open(out_dir / "queries.jsonl", "w", encoding="utf-8") as f:
        for r in test_rows:
            f.write(json.dumps({"_id": r["qa_id"], "text": r["query"], "query_type": r["query_type"]}) + "\n")
    with open(out_dir / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for r in test_rows:
            f.write(f"{r['qa_id']}\t{r['positive_id']}\t1\n")


def run_stage(cfg, run, rec) -> None:
    from pipeline.encode import encode_parquet
    from pipeline.models import resolve_embedder

    chunks_path = run.root / "corpus" / "chunks.parquet"
    chunks = pq.read_table(chunks_path)
    qa = pq.read_table(run.root / "sdg" / "qa.parquet").to_pylist()
    if not qa:
        raise ValueError(f"{run.root / 'sdg' / 'qa.parquet'} holds no QA pairs: nothing to train on")
    eval_set = eval_set_folder(cfg, chunks_path)
    frozen = eval_set is not None and (eval_set / "split.json").exists()
    if frozen:  # an earlier run on this very corpus fixed the split: reuse it so metrics stay comparable
        split_of = json.loads((eval_set / "split.json").read_text())
        print(f"[prep] reusing the fixed evaluation set {eval_set}", flush=True)
    else:
        split_of = split_documents(chunks.column("doc_id").to_pylist(), cfg.prep.val_fraction,
                                   cfg.prep.test_fraction, cfg.seed)
    rec.phase("split")

    mining_model = resolve_embedder(cfg.train.base_model if cfg.prep.mining_model == "base" else cfg.prep.mining_model)
    queries_path = rec.output("queries.tmp.parquet")
    pq.write_table(pa.Table.from_pylist([{"query": r["query"]} for r in qa]), queries_path)
    use_ray = len(qa) + chunks.num_rows > 20_000
    cache = run.root / "cache" / "embeddings"
    common = dict(batch_size=cfg.prep.batch_size, use_ray=use_ray, cpus=1)
    chunk_emb = encode_parquet(mining_model, chunks_path, "passage", cache, **common)
    query_emb = encode_parquet(mining_model, queries_path, "query", cache, **common)
    queries_path.unlink()
    rec.phase("embed")

    chunk_ids = chunks.column("chunk_id").to_pylist()
    chunk_docs = chunks.column("doc_id").to_pylist()
    chunk_texts = chunks.column("text").to_pylist()
    chunk_titles = chunks.column("title").to_pylist()
    test_docs = {d for d, s in split_of.items() if s == "test"}
    stats = {"skipped_top": 0, "same_document": 0, "held_out_document": 0, "above_margin": 0, "kept": 0}
    mined = mine_negatives(qa, chunk_ids, chunk_docs, chunk_emb, query_emb, candidates=cfg.prep.candidates,
                           margin=cfg.prep.margin, skip_top=cfg.prep.skip_top,
                           num_negatives=cfg.prep.num_negatives, banned_docs=test_docs, stats=stats,
                           depth=cfg.prep.roundtrip_top_k)
    qa, mined, roundtrip = roundtrip_filter(qa, mined, cfg.prep.roundtrip_top_k)
    rec.phase("mine")

    from pipeline.corpus import passage_text

    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for row, m in zip(qa, mined):
        p = m["positive"]
        splits[split_of.get(row["doc_id"], "train")].append({
            "qa_id": row["qa_id"], "query": row["query"], "query_type": row["query_type"],
            "positive_id": chunk_ids[p], "positive_doc_id": chunk_docs[p],
            "positive_text": passage_text(chunk_titles[p], chunk_texts[p]), "positive_score": m["positive_score"],
            "negative_ids": [chunk_ids[j] for j in m["negatives"]],
            "negative_texts": [passage_text(chunk_titles[j], chunk_texts[j]) for j in m["negatives"]],
            "negative_scores": m["negative_scores"]})
    if frozen:
        splits["test"] = pq.read_table(eval_set / "test.parquet").to_pylist()
    elif eval_set is not None:
        freeze_eval_set(eval_set, split_of, splits["test"])
    for name, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows, SPLIT_SCHEMA), rec.output(f"{name}.parquet"))
    write_beir(rec.dir / "beir_test", chunks, splits["test"])
    if not splits["train"]:
        raise ValueError("the training split is empty: the corpus needs more documents or QA pairs")
    rec.manifest.counts = {**{f"{k}_rows": len(v) for k, v in splits.items()},
                           "documents": {s: sum(1 for v in split_of.values() if v == s) for s in splits},
                           "negatives": stats, "roundtrip_filter": roundtrip,
                           "eval_set": {"path": str(eval_set) if eval_set else None, "reused": frozen}}
