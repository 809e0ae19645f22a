"""Merge stage: the shipped model is a * fine-tuned + (1 - a) * base, weight by weight.

Fine-tuning on synthetic queries can trade general ability for the generator's style. Averaging the
weights with the base (WiSE-FT, LM-Cocktail) keeps most of a real gain and gives back what was lost;
it cannot make a gain. The weight `a` is chosen on human dev queries when the user gives some
(`merge.dev_queries`: the grid's best NDCG@10 on them), else it is `merge.weight`. Synthetic queries
never choose it: they reward what fits the generator, not the users. Dev queries are scored over the
run's own chunks (a document ranks by its best chunk) and are never the test queries.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.beir import compute_metrics, json_lines, load_qrels, read_jsonl
from pipeline.embedders import load_model
from pipeline.encode import encode_parquet
from pipeline.errors import RetrofitError
from pipeline.index import build_index, search
from pipeline.models import resolve_embedder


@dataclass
class DevQueries:
    source: str
    queries: dict[str, str]               # qid -> text
    qrels: dict[str, dict[str, int]]      # qid -> relevant doc id -> grade
    dropped: int = 0                      # queries none of whose documents is in the corpus


def load_dev_queries(spec: str) -> DevQueries:
    """`FOLDER` (a BEIR folder: queries.jsonl and qrels/dev.tsv), `FOLDER:SPLIT` (qrels/SPLIT.tsv), or a
    JSONL file with one {"query": ..., "relevant": [doc ids] or {doc id: grade}} per line."""
    path, split = Path(spec), "dev"
    if not path.exists() and ":" in spec:
        head, _, split = spec.rpartition(":")
        path = Path(head)
    if path.is_dir():
        return _beir_split(path, split, spec)
    if not path.is_file():
        raise RetrofitError(f"merge.dev_queries: {spec} is neither a BEIR folder (optionally FOLDER:SPLIT) nor a "
                            "JSONL file")
    queries, qrels = {}, {}
    bad_json = lambda n, msg: RetrofitError(f"merge.dev_queries: {path} line {n} is not JSON: {msg}")  # noqa: E731
    for lineno, row in json_lines(path, bad_json):
        relevant = row.get("relevant") if isinstance(row, dict) else None
        if isinstance(relevant, list):
            relevant = {str(d): 1 for d in relevant}
        if not (isinstance(row, dict) and isinstance(row.get("query"), str) and row["query"].strip()
                and isinstance(relevant, dict) and relevant):
            raise RetrofitError(f"merge.dev_queries: {path} line {lineno} needs a non-empty \"query\" string and "
                                "\"relevant\": a list of document ids (or {id: grade})")
        qid = str(row.get("_id", lineno))
        queries[qid], qrels[qid] = row["query"], {str(d): int(g) for d, g in relevant.items()}
    if not queries:
        raise RetrofitError(f"merge.dev_queries: {path} holds no query")
    return DevQueries(spec, queries, qrels)


def _beir_split(folder: Path, split: str, spec: str) -> DevQueries:
    if split == "test":  # the test queries only ever give the final score
        raise RetrofitError(f"merge.dev_queries: {spec} names the test split; choosing the merge weight on the "
                            "queries that give the final score would flatter it. Use the train or dev split")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        have = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise RetrofitError(f"merge.dev_queries: {qrels_path} is missing (splits here: {', '.join(have) or 'none'}); "
                            "name one as FOLDER:SPLIT")
    texts = {str(q["_id"]): q["text"] for q in read_jsonl(folder / "queries.jsonl", ("_id", "text"))}
    qrels = {q: d for q, d in load_qrels(qrels_path).items() if q in texts}
    if not qrels:
        raise RetrofitError(f"merge.dev_queries: no query of {qrels_path} is in {folder / 'queries.jsonl'}")
    return DevQueries(spec, {q: texts[q] for q in qrels}, qrels)


class Merger:
    """The base and fine-tuned weights, loaded once; save(a, folder) writes a * tuned + (1 - a) * base
    (every floating-point tensor) as a model folder that keeps the tuned model's own files (tokenizer,
    prompts, max length)."""

    def __init__(self, base_path: str, tuned_path: str):
        self.model = load_model(tuned_path, device="cpu")
        self.tuned = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.base = load_model(base_path, device="cpu").state_dict()
        if self.tuned.keys() != self.base.keys() or any(self.tuned[k].shape != self.base[k].shape for k in self.tuned):
            raise RetrofitError(f"cannot merge {tuned_path} with {base_path}: their weights differ in names or shapes "
                                "(was the fine-tuned model trained from another base?)")

    def save(self, a: float, out_dir: Path) -> None:
        self.model.load_state_dict({k: a * v + (1 - a) * self.base[k] if v.is_floating_point() else v
                                    for k, v in self.tuned.items()})
        shutil.rmtree(out_dir, ignore_errors=True)
        self.model.save(str(out_dir), safe_serialization=True)


def merge_weights(base_path: str, tuned_path: str, a: float, out_dir: Path) -> None:
    """One mix, saved: Merger(base, tuned).save(a, out_dir)."""
    Merger(base_path, tuned_path).save(a, out_dir)


def dev_metrics(model_path: str, chunks_path: Path, doc_of_chunk: list[str], dev: DevQueries, top_k: int,
                cache: Path, batch_size: int) -> dict[str, float]:
    """BEIR metrics of one model on the dev queries over the run's chunks (a document scores its best chunk;
    `doc_of_chunk` holds each chunk's document id, in row order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    qids = sorted(dev.qrels)
    cache.mkdir(parents=True, exist_ok=True)
    # A folder of this call's own (the cache may be shared); the embeddings are cached by content.
    tables = Path(tempfile.mkdtemp(prefix="dev-", dir=cache))
    try:
        query_path = tables / "queries.parquet"
        pq.write_table(pa.table({"query": [dev.queries[q] for q in qids]}), query_path)
        chunk_emb = encode_parquet(model_path, chunks_path, "passage", cache, batch_size=batch_size)
        query_emb = encode_parquet(model_path, query_path, "query", cache, batch_size=batch_size)
    finally:
        shutil.rmtree(tables, ignore_errors=True)
    index, _ = build_index(chunk_emb, "flat")
    scores, idx = search(index, query_emb, 4 * top_k)  # several chunks may belong to one document
    run = {}
    for qi, q in enumerate(qids):
        best: dict[str, float] = {}
        for j, s in zip(idx[qi], scores[qi]):
            if j >= 0:
                doc = doc_of_chunk[j]
                best[doc] = max(best.get(doc, -1.0), float(s))
        run[q] = dict(sorted(best.items(), key=lambda kv: -kv[1])[:top_k])
    return compute_metrics(dev.qrels, run)[0]


def in_corpus(dev: DevQueries, doc_ids: set[str]) -> DevQueries:
    """Only the queries with a relevant document in the run's corpus (a subset run keeps fewer)."""
    qrels = {q: {d: g for d, g in docs.items() if d in doc_ids} for q, docs in dev.qrels.items()}
    qrels = {q: docs for q, docs in qrels.items() if docs}
    if not qrels:
        raise RetrofitError(f"merge.dev_queries: none of the {len(dev.qrels)} queries of {dev.source} has a relevant "
                            "document in this run's corpus (are they about other documents, or other ids?)")
    return DevQueries(dev.source, {q: dev.queries[q] for q in qrels}, qrels, len(dev.qrels) - len(qrels))


def choose_weight(curve: dict[float, dict[str, float]]) -> float:
    """The grid point with the best dev NDCG@10; a tie goes to the smaller weight (closer to the base)."""
    return max(sorted(curve), key=lambda a: curve[a]["ndcg@10"])


def run_stage(cfg, run, rec) -> None:
    import pyarrow.parquet as pq

    base, tuned = resolve_embedder(cfg.train.base_model), str(run.root / "train" / "model")
    merger = Merger(base, tuned)
    mc = cfg.merge
    model_dir = rec.output("model")
    counts: dict = {"weight": mc.weight, "chosen_by": "merge.weight (no dev queries given)"}
    if mc.dev_queries:
        chunks_path = run.root / "corpus" / "chunks.parquet"
        doc_of_chunk = [str(d) for d in pq.read_table(chunks_path, columns=["doc_id"]).column("doc_id").to_pylist()]
        dev = in_corpus(load_dev_queries(mc.dev_queries), set(doc_of_chunk))
        print(f"[merge] choosing the weight on {len(dev.qrels)} dev queries from {dev.source}"
              + (f" ({dev.dropped} dropped: their documents are not in this corpus)" if dev.dropped else ""), flush=True)
        curve = {}
        candidates = rec.dir / "candidates"
        for a in sorted(set(mc.grid)):
            path = base if a == 0 else tuned if a == 1 else str(candidates / f"a{a:g}")
            if 0 < a < 1:
                merger.save(a, Path(path))
            curve[a] = dev_metrics(path, chunks_path, doc_of_chunk, dev, cfg.eval.top_k, run.root / "cache" / "eval",
                                   cfg.eval.texts_per_batch)
            print(f"[merge] a={a:g}: dev NDCG@10 {curve[a]['ndcg@10']:.4f}", flush=True)
        weight = choose_weight(curve)
        shutil.rmtree(candidates, ignore_errors=True)
        counts = {"weight": weight, "chosen_by": f"best dev NDCG@10 over {sorted(curve)}",
                  "dev_queries": len(dev.qrels), "dev_queries_dropped": dev.dropped,
                  "curve": {f"{a:g}": {m: curve[a][m] for m in ("ndcg@10", "recall@10", "recall@100")} for a in curve}}
        if weight == 0:
            print("[merge] the base model scores best on your dev queries: the shipped model is the base", flush=True)
    merger.save(counts["weight"], model_dir)
    print(f"[merge] shipped model = {counts['weight']:g} x fine-tuned + {1 - counts['weight']:g} x base "
          f"({counts['chosen_by']}) -> {model_dir}", flush=True)
    rec.manifest.counts = counts
