"""Hard-negative mining: our prep stage's miner vs sentence-transformers' `mine_hard_negatives`.

Same machine, same model (packaged all-MiniLM-L6-v2), same corpus (SciFact's 5,183 abstracts, one
passage each), comparable settings (30 candidates, drop candidates above 0.95 x the positive's score,
5 negatives from the top). Each method runs in a fresh child process, so its time (embedding corpus
and queries + search + filtering; model load excluded) and peak RSS are its own.

Two query sets:
- human: SciFact's 1,110 train+test claims, positive = their first relevant abstract. A mined negative
  that is another abstract labelled relevant in qrels is a known false negative (100 claims have more
  than one relevant abstract).
- synthetic: the claims our SDG wrote for the first 300 abstracts (benchmarks/work/scifact-300, made by
  benchmarks/scifact.py), positive = the source abstract. Proxy false negative: an abstract that human
  annotators judged relevant to the same claim as the source abstract.

    .venv/bin/python benchmarks/mining.py [--queries human synthetic]

Prints a table and the ratios (ours / sentence-transformers) and writes benchmarks/results/mining.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
SYNTHETIC_RUN = ROOT / "benchmarks" / "work" / "scifact-300"
SETTINGS = {"candidates": 30, "margin": 0.95, "num_negatives": 5, "batch_size": 64}


def load_corpus(data: Path) -> tuple[list[str], list[str]]:
    from pipeline.beir import passage_text

    ids, texts = [], []
    with open(data / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            ids.append(str(d["_id"]))
            texts.append(passage_text(d.get("title", ""), d["text"]))
    return ids, texts


def load_qrels(data: Path) -> dict[str, list[str]]:
    qrels: dict[str, list[str]] = {}
    for name in ("train.tsv", "test.tsv"):
        for line in (data / "qrels" / name).read_text().splitlines()[1:]:
            q, d, score = line.split("\t")
            if int(score) > 0:
                qrels.setdefault(q, []).append(d)
    return qrels


def load_queries(kind: str, data: Path) -> list[dict]:
    """[{query, positive_doc, labelled: set of other relevant doc ids}]"""
    qrels = load_qrels(data)
    if kind == "human":
        texts = {}
        with open(data / "queries.jsonl", encoding="utf-8") as f:
            for line in f:
                q = json.loads(line)
                texts[str(q["_id"])] = q["text"]
        return [{"query": texts[q], "positive_doc": docs[0], "labelled": sorted(set(docs[1:]))}
                for q, docs in qrels.items() if q in texts]
    import pyarrow.parquet as pq

    qa_path = SYNTHETIC_RUN / "sdg" / "qa.parquet"
    if not qa_path.exists():
        raise SystemExit(f"{qa_path} is missing: run benchmarks/scifact.py --docs 300 first (it writes the queries)")
    co_relevant: dict[str, set[str]] = {}
    for docs in qrels.values():
        for d in docs:
            co_relevant.setdefault(d, set()).update(x for x in docs if x != d)
    return [{"query": r["query"], "positive_doc": r["doc_id"], "labelled": sorted(co_relevant.get(r["doc_id"], ()))}
            for r in pq.read_table(qa_path).to_pylist()]


def mine_ours(model: str, doc_ids: list[str], passages: list[str], queries: list[dict]) -> list[list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.encode import encode_parquet
    from pipeline.index import build_index
    from pipeline.prep import mine_negatives

    with tempfile.TemporaryDirectory() as tmp:  # a fresh cache: the embeddings are computed, not reused
        tmp = Path(tmp)
        pq.write_table(pa.table({"title": [""] * len(passages), "text": passages}), tmp / "chunks.parquet")
        pq.write_table(pa.table({"query": [q["query"] for q in queries]}), tmp / "queries.parquet")
        chunk_emb = encode_parquet(model, tmp / "chunks.parquet", "passage", tmp / "cache",
                                   batch_size=SETTINGS["batch_size"])
        query_emb = encode_parquet(model, tmp / "queries.parquet", "query", tmp / "cache",
                                   batch_size=SETTINGS["batch_size"])
    stats = dict.fromkeys(["skipped_top", "other_positive", "same_document", "held_out_document",
                           "above_margin", "kept"], 0)
    index, _ = build_index(chunk_emb, "flat")
    rows = [{"chunk_id": q["positive_doc"], "doc_id": q["positive_doc"]} for q in queries]
    mined = mine_negatives(rows, doc_ids, doc_ids, chunk_emb, query_emb, candidates=SETTINGS["candidates"],
                           margin=SETTINGS["margin"], skip_top=0, num_negatives=SETTINGS["num_negatives"],
                           banned_docs=set(), stats=stats, index=index)
    return [[doc_ids[j] for j in m["negatives"]] for m in mined]


def mine_sentence_transformers(model: str, doc_ids: list[str], passages: list[str],
                               queries: list[dict]) -> list[list[str]]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    st = SentenceTransformer(model, local_files_only=True)
    text_of = dict(zip(doc_ids, passages))
    ds = Dataset.from_dict({"anchor": [q["query"] for q in queries],
                            "positive": [text_of[q["positive_doc"]] for q in queries]})
    out = mine_hard_negatives(ds, st, corpus=passages, range_max=SETTINGS["candidates"],
                              relative_margin=1 - SETTINGS["margin"], num_negatives=SETTINGS["num_negatives"],
                              sampling_strategy="top", output_format="labeled-list", batch_size=SETTINGS["batch_size"],
                              use_faiss=True, verbose=False)
    # labeled-list keeps every query with however many negatives survived: [positive, *negatives].
    doc_of = {t: d for d, t in zip(doc_ids, passages)}
    by_query = {row["anchor"]: [doc_of[t] for t, label in zip(row["positive"], row["labels"]) if label == 0]
                for row in out}
    return [by_query.get(q["query"], []) for q in queries]


def worker(method: str, kind: str, data: Path) -> dict:
    from pipeline.models import resolve_embedder
    from pipeline.ray_runtime import set_threads

    set_threads(2)
    model = resolve_embedder("minilm")
    doc_ids, passages = load_corpus(data)
    queries = load_queries(kind, data)
    mine = mine_ours if method == "ours" else mine_sentence_transformers
    mine(model, doc_ids[:64], passages[:64], [q for q in queries if q["positive_doc"] in doc_ids[:64]][:8])  # warm-up
    t0 = time.perf_counter()
    negatives = mine(model, doc_ids, passages, queries)
    seconds = time.perf_counter() - t0
    total = sum(len(n) for n in negatives)
    false = sum(len(set(n) & set(q["labelled"])) for n, q in zip(negatives, queries))
    multi = [(n, q) for n, q in zip(negatives, queries) if q["labelled"]]
    return {"method": method, "queries": kind, "n_queries": len(queries), "seconds": round(seconds, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "negatives": total, "queries_with_5": sum(len(n) == SETTINGS["num_negatives"] for n in negatives),
            "false_negatives": false, "false_negative_rate": round(false / max(total, 1), 5),
            "queries_with_other_labelled": len(multi),
            "false_negative_rate_on_those": round(
                sum(len(set(n) & set(q["labelled"])) for n, q in multi) / max(sum(len(n) for n, _ in multi), 1), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", nargs="+", default=["human", "synthetic"], choices=["human", "synthetic"])
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "QUERIES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, Path(args.data))), flush=True)
        return 0

    from benchmarks.common import write_result

    results, ratios = [], {}
    for kind in args.queries:
        pair = {}
        for method in ("ours", "sentence-transformers"):
            proc = subprocess.run([sys.executable, __file__, "--worker", method, kind, "--data", args.data],
                                  capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            pair[method] = json.loads(line[len("RESULT "):])
            results.append(pair[method])
        ours, st = pair["ours"], pair["sentence-transformers"]
        ratios[kind] = {"time_ours_over_st": round(ours["seconds"] / st["seconds"], 3),
                        "speed_ours_over_st": round(st["seconds"] / ours["seconds"], 3),
                        "peak_rss_ours_over_st": round(ours["peak_rss_mib"] / st["peak_rss_mib"], 3)}

    header = f"{'queries':10} {'method':22} {'n':>5} {'seconds':>8} {'peak MiB':>9} {'negs':>6} {'FN':>4} {'FN rate':>8} {'FN rate*':>8}"
    print(header)
    for r in results:
        print(f"{r['queries']:10} {r['method']:22} {r['n_queries']:5d} {r['seconds']:8.1f} {r['peak_rss_mib']:9.0f} "
              f"{r['negatives']:6d} {r['false_negatives']:4d} {r['false_negative_rate']:8.4f} "
              f"{r['false_negative_rate_on_those']:8.4f}")
    print("FN rate*: among queries that have other labelled-relevant abstracts")
    for kind, r in ratios.items():
        print(f"{kind}: time ours/ST {r['time_ours_over_st']:.2f} (speed-up x{r['speed_ours_over_st']:.2f}), "
              f"peak RSS ours/ST {r['peak_rss_ours_over_st']:.2f}")
    path = write_result("mining", {"settings": SETTINGS, "results": results, "ratios": ratios,
                                   "command": "benchmarks/mining.py --queries " + " ".join(args.queries)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
