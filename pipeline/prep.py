"""Prep stage: split QA pairs by document and mine hard negatives with the base embedder + FAISS.

- Split: documents (not QA pairs) are assigned to train/val/test with a seeded shuffle, so no document
  feeds two splits and test chunks never appear in a training row, as positive or as negative. The
  split and test queries are frozen per corpus so later runs are measured on the same set.
- Positives: a query with several positive chunks (multi-hop `related_chunk_ids`, or the same query
  written for several chunks) is unrolled into one row per positive; none of them is ever a negative.
- Mining: chunks and queries are embedded with the mining model; a FAISS index (exact, IVF or HNSW;
  GPU when there is one) returns each query's nearest chunks; candidates that are a positive, come
  from the positive's document, score above `margin x positive score` (likely false negatives), belong
  to the test split, or that an optional judge (LLM or cross-encoder) rates as relevant as the
  positive are dropped. N negatives are then taken from the top or sampled.
- The test split is also written in BEIR format (corpus = every chunk) for any BEIR tool to check.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.beir import passage_text
from pipeline.encode import encode_parquet
from pipeline.errors import RetrofitError
from pipeline.index import build_index, search
from pipeline.judge import QUERY_RUBRIC, make_judge
from pipeline.models import resolve_embedder
from pipeline.rundir import tree_fingerprint
from pipeline.storage import Folder, cache_dir

SPLIT_SCHEMA = pa.schema([
    ("qa_id", pa.string()), ("query", pa.string()), ("query_type", pa.string()),
    ("positive_id", pa.string()), ("positive_doc_id", pa.string()), ("positive_text", pa.string()),
    ("positive_score", pa.float32()), ("negative_ids", pa.list_(pa.string())),
    ("negative_texts", pa.list_(pa.string())), ("negative_scores", pa.list_(pa.float32())),
    ("positive_ids", pa.list_(pa.string())),  # every positive of the query (multi-hop, repeated queries)
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


def mine_negatives(qa: list[dict], chunk_ids: list[str], chunk_docs: list[str], chunk_emb: np.ndarray,
                   query_emb: np.ndarray, *, candidates: int, margin: float, skip_top: int,
                   num_negatives: int, banned_docs: set[str], stats: dict, depth: int = 0,
                   other_positives: list[set[str]] | None = None, selection: str = "top", seed: int = 0,
                   index=None, judge=None, judge_top: int = 5, judge_ratio: float = 1.0,
                   passages: list[str] | None = None) -> list[dict]:
    """For each QA row, the hard negatives that survive the false-negative filters, and the rank of its
    positive among the `depth` (at least candidates) nearest chunks (-1: further down).

    A candidate is dropped when it is the positive or another positive of the same query, comes from
    the positive's document or a held-out document, scores above margin x the positive's score, or
    (with a judge) is rated about as relevant as the positive itself."""
    pos_index = {cid: i for i, cid in enumerate(chunk_ids)}
    if index is None:
        index, _ = build_index(chunk_emb)
    scores, idx = search(index, query_emb, max(candidates + skip_top + 1, depth))
    rows = []
    for r, row in enumerate(qa):
        p = pos_index[row["chunk_id"]]
        pos_score = float(query_emb[r] @ chunk_emb[p])
        banned = {pos_index[c] for c in (other_positives[r] if other_positives else ()) if c in pos_index}
        ranked = [(int(j), float(s)) for j, s in zip(idx[r], scores[r]) if j >= 0]
        positive_rank = next((k for k, (j, _) in enumerate(ranked) if j == p), -1)
        survivors = []
        for rank, (j, s) in enumerate(ranked[:candidates + skip_top + 1]):
            if j == p:
                continue
            if rank < skip_top:
                stats["skipped_top"] += 1
            elif j in banned:
                stats["other_positive"] += 1
            elif chunk_docs[j] == row["doc_id"]:
                stats["same_document"] += 1
            elif chunk_docs[j] in banned_docs:
                stats["held_out_document"] += 1
            elif s > margin * pos_score:
                stats["above_margin"] += 1
                stats.setdefault("_dropped", []).append(s)
            else:
                survivors.append((j, s))
        rows.append({"positive": p, "positive_score": pos_score, "positive_rank": positive_rank,
                     "survivors": survivors})
    if judge is not None:
        _second_opinion(qa, rows, judge, judge_top, judge_ratio, passages, stats)
    rng = np.random.default_rng(seed)
    out = []
    for m in rows:
        survivors = m.pop("survivors")
        if selection == "sample" and len(survivors) > num_negatives:
            keep = sorted(rng.choice(len(survivors), num_negatives, replace=False))
            chosen = [survivors[i] for i in keep]
        else:
            chosen = survivors[:num_negatives]
        stats["kept"] += len(chosen)
        out.append({**m, "negatives": [j for j, _ in chosen], "negative_scores": [s for _, s in chosen]})
    stats["scores"] = {"positive": quantiles([m["positive_score"] for m in out]),
                       "kept_negative": quantiles([s for m in out for s in m["negative_scores"]]),
                       "dropped_above_margin": quantiles(stats.pop("_dropped", []))}
    return out


def _second_opinion(qa, rows, judge, top: int, ratio: float, passages: list[str], stats: dict) -> None:
    """Ask the judge about each query's positive and its `top` best surviving candidates; drop the
    candidates it rates at least ratio x the positive (in place)."""
    pairs, where = [], []
    for r, (row, m) in enumerate(zip(qa, rows)):
        pairs.append((row["query"], passages[m["positive"]]))
        where.append((r, -1))
        for k, (j, _) in enumerate(m["survivors"][:top]):
            pairs.append((row["query"], passages[j]))
            where.append((r, k))
    judged = judge.score(pairs)
    positive_score = {r: float(v) for (r, k), v in zip(where, judged) if k == -1}
    flagged: dict[int, set[int]] = {}
    for (r, k), v in zip(where, judged):
        if k >= 0 and float(v) >= ratio * positive_score[r]:
            flagged.setdefault(r, set()).add(k)
    for r, ks in flagged.items():
        rows[r]["survivors"] = [c for k, c in enumerate(rows[r]["survivors"]) if k not in ks]
    stats["judged"] = len(pairs) - len(rows)
    stats["judge_dropped"] = sum(len(ks) for ks in flagged.values())


def near_duplicates(qa: list[dict], query_emb: np.ndarray, threshold: float) -> tuple[np.ndarray, dict]:
    """Keep-mask that drops a query whose embedding is within `threshold` cosine of an earlier kept query
    for the same chunk (rephrasings that add nothing); other chunks' queries are never compared."""
    keep = np.ones(len(qa), dtype=bool)
    if threshold <= 0:
        return keep, {"threshold": 0, "dropped": 0}
    kept_by_chunk: dict[str, list[int]] = {}
    examples = []
    for i, row in enumerate(qa):
        earlier = kept_by_chunk.setdefault(row["chunk_id"], [])
        if earlier and float(np.max(query_emb[earlier] @ query_emb[i])) >= threshold:
            keep[i] = False
            if len(examples) < 5:
                examples.append(row["query"])
        else:
            earlier.append(i)
    return keep, {"threshold": threshold, "dropped": int((~keep).sum()), "dropped_examples": examples}


def judge_queries(qa: list[dict], passage_of: dict[str, str], judge, min_score: float) -> tuple[np.ndarray, dict]:
    """Keep-mask of the queries the judge scores at least min_score against their own chunk (the rubric
    is in pipeline/judge.py: answered by the chunk, about its specific content, search-box shaped)."""
    scores = judge.score([(row["query"], passage_of[row["chunk_id"]]) for row in qa])
    keep = scores >= min_score
    dropped = [(row["query"], round(float(sc), 3)) for row, sc, k in zip(qa, scores, keep) if not k]
    print(f"[prep] query judge (score >= {min_score}): kept {int(keep.sum())} of {len(qa)} queries", flush=True)
    return keep, {"min_score": min_score, "in": len(qa), "out": int(keep.sum()),
                  "scores": quantiles([float(x) for x in scores]), "dropped_examples": dropped[:5]}


def roundtrip_filter(qa: list[dict], mined: list[dict], split_of_row: list[str], top_k: int
                     ) -> tuple[list[dict], list[dict], dict]:
    """Keep a *training* query only if the mining model ranks its source chunk in the top k: drops queries
    that do not describe their chunk (meta replies such as "The claim is not supported", copied examples).

    Val and test queries are never filtered this way: the mining model is the base model that evaluation
    compares against, and a split kept only where the base already finds the answer flatters its recall
    (Recall@100 1.0 by construction) and hides regressions."""
    if top_k <= 0:
        return qa, mined, {"top_k": 0, "applied_to": "train", "in": len(qa), "out": len(qa)}
    keep = [split != "train" or 0 <= m["positive_rank"] < top_k for m, split in zip(mined, split_of_row)]
    examples = [row["query"] for row, k in zip(qa, keep) if not k][:5]
    n_train = sum(split == "train" for split in split_of_row)
    summary = {"top_k": top_k, "applied_to": "train", "in": n_train, "out": n_train - keep.count(False),
               "dropped_examples": examples}
    print(f"[prep] round-trip filter on training queries (source chunk in the top {top_k}): kept "
          f"{summary['out']} of {n_train}; val and test queries are not filtered", flush=True)
    return ([r for r, k in zip(qa, keep) if k], [m for m, k in zip(mined, keep) if k], summary)


def unroll_positives(qa: list[dict], doc_of: dict[str, str]) -> list[dict]:
    """One row per (query, positive), each knowing all positives of its query.

    A query's positives are its own chunk, the chunks in `related_chunk_ids` (multi-hop questions that
    need several chunks) and the chunks of other rows asking the very same query. Extra positives become
    rows of their own (qa_id + '#p1', ...) sharing the original qa_id as `group_id`."""
    def related_of(row):
        return [c for c in (row.get("related_chunk_ids") or []) if c != row["chunk_id"] and c in doc_of]

    by_text: dict[str, set[str]] = {}
    for row in qa:
        by_text.setdefault(row["query"].strip().lower(), set()).update([row["chunk_id"], *related_of(row)])
    out = []
    for row in qa:
        related = related_of(row)
        positives = by_text[row["query"].strip().lower()]
        base = {**row, "group_id": row["qa_id"], "positives": positives}
        out.append(base)
        out.extend({**base, "qa_id": f"{row['qa_id']}#p{k}", "chunk_id": c, "doc_id": doc_of[c]}
                   for k, c in enumerate(related, start=1))
    return out


def quantiles(values: list[float]) -> dict:
    """Where a score distribution sits (for the manifest): count, mean and 10/50/90th percentiles."""
    if not values:
        return {"n": 0}
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return {"n": len(values), "mean": round(float(np.mean(values)), 4), "p10": round(float(p10), 4),
            "p50": round(float(p50), 4), "p90": round(float(p90), 4)}


def eval_set_shelf(cfg, chunks_path: Path) -> tuple[Folder, str] | None:
    """Where this corpus's fixed evaluation set lives: the folder (local or a bucket) holding every
    corpus's set, and this one's name (the chunks' fingerprint); None if fixed sets are off."""
    if not cfg.prep.fixed_eval_set:
        return None
    # "v2": test queries are no longer round-trip filtered; sets frozen before that are never reused.
    return Folder(cfg.prep.eval_set_root or cache_dir() / "eval_sets"), f"v2-{tree_fingerprint(chunks_path)}"


def freeze_eval_set(folder: Path, split_of: dict[str, str], test_rows: list[dict]) -> None:
    """Keep the document split and the test queries for later runs on the same corpus."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    # A private temporary folder and an atomic rename: two runs freezing at once never mix their files.
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    (tmp / "split.json").write_text(json.dumps(split_of))
    pq.write_table(pa.Table.from_pylist(test_rows, SPLIT_SCHEMA), tmp / "test.parquet")
    try:
        tmp.rename(folder)
    except OSError:  # another run froze this corpus first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


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
            for positive in r.get("positive_ids") or [r["positive_id"]]:
                f.write(f"{r['qa_id']}\t{positive}\t1\n")


def run_stage(cfg, run, rec) -> None:
    chunks_path = run.root / "corpus" / "chunks.parquet"
    chunks = pq.read_table(chunks_path)
    qa = pq.read_table(run.root / "sdg" / "qa.parquet").to_pylist()
    if not qa:
        raise RetrofitError(f"{run.root / 'sdg' / 'qa.parquet'} holds no QA pairs: nothing to train on")
    # The chunk columns, read once: ids, documents and the passage text every model sees.
    chunk_ids = chunks.column("chunk_id").to_pylist()
    chunk_docs = chunks.column("doc_id").to_pylist()
    passages = [passage_text(t, x) for t, x in zip(chunks.column("title").to_pylist(), chunks.column("text").to_pylist())]
    doc_of = dict(zip(chunk_ids, chunk_docs))
    unknown = next((r for r in qa if r["chunk_id"] not in doc_of), None)
    if unknown is not None:
        raise RetrofitError(f"sdg/qa.parquet row {unknown['qa_id']!r}: chunk_id {unknown['chunk_id']!r} is not in "
                         "corpus/chunks.parquet (QA pairs from another corpus?)")
    n_queries = len(qa)
    qa = unroll_positives(qa, doc_of)
    n_pairs = len(qa)
    group_doc = {r["qa_id"]: r["doc_id"] for r in qa if r["qa_id"] == r["group_id"]}
    shelf = eval_set_shelf(cfg, chunks_path)
    eval_set = shelf[0].pull(shelf[1]) if shelf else None
    frozen = eval_set is not None and (eval_set / "split.json").exists()
    if frozen:  # an earlier run on this very corpus fixed the split: reuse it so metrics stay comparable
        split_of = json.loads((eval_set / "split.json").read_text())
        print(f"[prep] reusing the fixed evaluation set {shelf[0].location}/{shelf[1]}", flush=True)
    else:
        split_of = split_documents(chunk_docs, cfg.prep.val_fraction,
                                   cfg.prep.test_fraction, cfg.seed)
    rec.phase("split")

    mining_model = resolve_embedder(cfg.prep.mining_model or cfg.train.base_model)
    queries_path = rec.output("queries.tmp.parquet")
    pq.write_table(pa.Table.from_pylist([{"query": r["query"]} for r in qa]), queries_path)
    use_ray = len(qa) + chunks.num_rows > 20_000
    cache = run.root / "cache" / "embeddings"
    where = cfg.prep.placement
    common = dict(batch_size=cfg.prep.texts_per_batch, use_ray=use_ray, num_actors=where.num_actors,
                  cpus=where.cpus_per_actor, num_gpus=where.gpus_per_actor, resources=where.resources)
    chunk_emb = encode_parquet(mining_model, chunks_path, "passage", cache, **common)
    query_emb = encode_parquet(mining_model, queries_path, "query", cache, **common)
    queries_path.unlink()
    keep, near_dup = near_duplicates(qa, query_emb, cfg.prep.near_duplicate_cosine)
    qa, query_emb = [r for r, k in zip(qa, keep) if k], query_emb[keep]
    rec.phase("embed")
    judged = None
    if cfg.prep.query_judge.kind != "none":
        judge = make_judge(cfg.prep.query_judge, cfg.sdg.llm, template=QUERY_RUBRIC)
        keep, judged = judge_queries(qa, dict(zip(chunk_ids, passages)), judge, cfg.prep.query_judge_min)
        qa, query_emb = [r for r, k in zip(qa, keep) if k], query_emb[keep]
        rec.phase("judge")

    test_docs = {d for d, s in split_of.items() if s == "test"}
    p = cfg.prep
    index, index_desc = build_index(chunk_emb, p.index, exact_max=p.exact_search_max_chunks, nprobe=p.ivf_nprobe,
                                    ef_search=p.hnsw_ef_search, use_gpu=p.gpu_index)
    print(f"[prep] search index: {index_desc}", flush=True)
    judge = make_judge(p.judge, cfg.sdg.llm)
    stats = dict.fromkeys(["skipped_top", "other_positive", "same_document", "held_out_document",
                           "above_margin", "kept"], 0)
    mined = mine_negatives(qa, chunk_ids, chunk_docs, chunk_emb, query_emb, candidates=p.candidates,
                           margin=p.margin, skip_top=p.skip_top, num_negatives=p.num_negatives,
                           banned_docs=test_docs, stats=stats, depth=p.roundtrip_top_k,
                           other_positives=[row["positives"] for row in qa], selection=p.negative_selection,
                           seed=cfg.seed, index=index, judge=judge, judge_top=p.judge_top,
                           judge_ratio=p.judge_ratio, passages=passages)
    # A query belongs to its first positive's split.
    split_of_row = [split_of.get(group_doc[row["group_id"]], "train") for row in qa]
    qa, mined, roundtrip = roundtrip_filter(qa, mined, split_of_row, p.roundtrip_top_k)
    rec.phase("mine")

    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    cross_split = 0
    for row, m in zip(qa, mined):
        pos = m["positive"]
        # An extra positive from another split would leak a held-out chunk into training (or a training
        # chunk into the test set), so it is left out.
        split = split_of.get(group_doc[row["group_id"]], "train")
        if split_of.get(chunk_docs[pos], "train") != split:
            cross_split += 1
            continue
        if split == "test" and row["qa_id"] != row["group_id"]:
            continue  # the test set keeps one row per query; its qrels list every positive
        splits[split].append({
            "qa_id": row["qa_id"], "query": row["query"], "query_type": row["query_type"],
            "positive_id": chunk_ids[pos], "positive_doc_id": chunk_docs[pos],
            "positive_text": passages[pos], "positive_score": m["positive_score"],
            "negative_ids": [chunk_ids[j] for j in m["negatives"]],
            "negative_texts": [passages[j] for j in m["negatives"]],
            "negative_scores": m["negative_scores"], "positive_ids": sorted(row["positives"])})
    stats["cross_split_positive"] = cross_split
    if frozen:
        splits["test"] = pq.read_table(eval_set / "test.parquet").to_pylist()
    elif eval_set is not None:
        freeze_eval_set(eval_set, split_of, splits["test"])
        shelf[0].push(shelf[1])  # bucket shelves: last writer wins if two runs freeze one corpus at once
    for name, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows, SPLIT_SCHEMA), rec.output(f"{name}.parquet"))
    write_beir(rec.dir / "beir_test", chunks, splits["test"])
    if not splits["train"]:
        raise RetrofitError("the training split is empty: the corpus needs more documents or QA pairs")
    rec.manifest.counts = {**{f"{k}_rows": len(v) for k, v in splits.items()}, "queries": n_queries,
                           "query_positive_pairs": n_pairs,
                           "documents": {s: sum(1 for v in split_of.values() if v == s) for s in splits},
                           "negatives": stats, "near_duplicates": near_dup, "query_judge": judged,
                           "roundtrip_filter": roundtrip,
                           "eval_set": {"path": f"{shelf[0].location}/{shelf[1]}" if shelf else None, "reused": frozen}}
