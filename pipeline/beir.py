"""BEIR's formats and metrics, with no model in sight: how a chunk is shown to embedders, reading a BEIR
folder (corpus.jsonl, queries.jsonl, qrels/*.tsv) with errors that name the file and line, and the
retrieval metrics (pytrec_eval, what BEIR itself uses)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.errors import RetrofitError


def passage_text(title: str, text: str) -> str:
    """How a chunk is shown to embedders everywhere (BEIR's convention: title, space, text)."""
    return f"{title} {text}".strip() if title else text


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


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
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
    corpus = read_jsonl(folder / "corpus.jsonl", ("_id", "text"))
    query_rows = read_jsonl(folder / "queries.jsonl", ("_id", "text"))
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


# Human dev queries (merge.dev_queries): they choose the merge weight and gate the reranker.
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


def in_corpus(dev: DevQueries, doc_ids: set[str]) -> DevQueries:
    """Only the queries with a relevant document in the run's corpus (a subset run keeps fewer)."""
    qrels = {q: {d: g for d, g in docs.items() if d in doc_ids} for q, docs in dev.qrels.items()}
    qrels = {q: docs for q, docs in qrels.items() if docs}
    if not qrels:
        raise RetrofitError(f"merge.dev_queries: none of the {len(dev.qrels)} queries of {dev.source} has a relevant "
                            "document in this run's corpus (are they about other documents, or other ids?)")
    return DevQueries(dev.source, {q: dev.queries[q] for q in qrels}, qrels, len(dev.qrels) - len(qrels))
