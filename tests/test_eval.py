import json
import subprocess
import sys

import pytest

from pipeline.beir import BeirFormatError, compute_metrics, load_beir
from pipeline.retrieval import retrieve
from tests.conftest import SCIFACT


def test_scifact_base_reproduces_published_ndcg_and_matches_beir(base_model, tmp_path):
    """all-MiniLM-L6-v2 on BEIR SciFact: NDCG@10 0.6451, and BEIR's own evaluator agrees to 4 decimals."""
    data = load_beir(SCIFACT)
    qrels = data.qrels
    run = retrieve(base_model, data.corpus, data.queries, sorted(qrels), 100, tmp_path, 64)
    ours, _ = compute_metrics(qrels, run)
    assert ours["ndcg@10"] == pytest.approx(0.6451, abs=0.001)

    from beir.retrieval.evaluation import EvaluateRetrieval

    ndcg, _map, recall, _ = EvaluateRetrieval.evaluate(qrels, run, [1, 3, 5, 10, 100])
    mrr = EvaluateRetrieval.evaluate_custom(qrels, run, [10], metric="mrr")
    for k in (1, 3, 5, 10):
        assert ours[f"ndcg@{k}"] == pytest.approx(ndcg[f"NDCG@{k}"], abs=1e-4)
    for k in (1, 5, 10, 100):
        assert ours[f"recall@{k}"] == pytest.approx(recall[f"Recall@{k}"], abs=1e-4)
    assert ours["map@10"] == pytest.approx(_map["MAP@10"], abs=1e-4)
    assert ours["mrr@10"] == pytest.approx(mrr["MRR@10"], abs=1e-4)

    # Reference rows: BM25 beats the dense base on SciFact's human claims, and fusing both beats either.
    from pipeline.lexical import bm25_run, rrf

    lexical = bm25_run(data.corpus, data.queries, sorted(qrels), 100)
    bm25, _ = compute_metrics(qrels, lexical)
    hybrid, _ = compute_metrics(qrels, rrf([lexical, run], 100))
    assert bm25["ndcg@10"] == pytest.approx(0.6863, abs=0.01)
    assert hybrid["ndcg@10"] == pytest.approx(0.7182, abs=0.01) and hybrid["ndcg@10"] > bm25["ndcg@10"] > ours["ndcg@10"]


def _small_beir(dst, n_queries=20):
    data = load_beir(SCIFACT)
    corpus, queries, qrels = data.corpus, data.queries, data.qrels
    qids = sorted(qrels)[:n_queries]
    keep = {d for q in qids for d in qrels[q]}
    docs = [d for d in corpus if d["_id"] in keep] + corpus[:150]
    (dst / "qrels").mkdir(parents=True)
    (dst / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (dst / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": queries[q]}) + "\n" for q in qids))
    (dst / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q in qids for d, s in qrels[q].items()))
    return dst


def test_cli_eval_writes_metrics_json(tmp_path):
    beir = _small_beir(tmp_path / "beir")
    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", "--beir", str(beir), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"minilm", "bm25 (reference)", "bm25+minilm RRF (reference)"}
    assert set(metrics["minilm"]) >= {"ndcg@1", "ndcg@10", "recall@10", "recall@100", "map@10", "mrr@10"}
    assert 0.3 < metrics["minilm"]["ndcg@10"] <= 1.0


def test_malformed_beir_folders_name_the_file_and_line(tmp_path):
    beir = _small_beir(tmp_path / "beir", n_queries=3)
    (beir / "queries.jsonl").write_text('{"_id": "1", "text": "ok"}\n{broken\n')
    with pytest.raises(BeirFormatError, match=r"queries.jsonl:2: invalid JSON"):
        load_beir(beir)
    (beir / "queries.jsonl").write_text('{"_id": "1"}\n')
    with pytest.raises(BeirFormatError, match=r"queries.jsonl:1: missing field"):
        load_beir(beir)
    (beir / "queries.jsonl").unlink()
    with pytest.raises(BeirFormatError, match="queries.jsonl: missing"):
        load_beir(beir)
    (beir / "queries.jsonl").write_text('{"_id": "1", "text": "ok"}\n')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\tdoc\n")
    with pytest.raises(BeirFormatError, match=r"test.tsv:2: expected 3"):
        load_beir(beir)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", "--beir", str(beir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "test.tsv:2" in proc.stderr and "Traceback" not in proc.stderr


def test_two_evaluations_at_once_share_the_cache_safely(tmp_path):
    """Two `retrofit eval` runs on different BEIR folders, one cache folder, at the same time: each gets the
    metrics it gets alone (temporary files are private, finished ones are renamed into place)."""
    import os

    a = _small_beir(tmp_path / "a", n_queries=12)
    b = tmp_path / "b"
    b.mkdir()
    (b / "qrels").mkdir()
    docs = [json.loads(x) for x in (a / "corpus.jsonl").read_text().splitlines()]
    (b / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:-60]))  # judged ones first
    keep = {d["_id"] for d in docs[:-60]}
    rels = [x.split("\t") for x in (a / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    rels = [r for r in rels if r[1] in keep]
    (b / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in rels))
    (b / "queries.jsonl").write_text((a / "queries.jsonl").read_text())
    env = {**os.environ, "RETROFIT_CACHE": str(tmp_path / "shared-cache")}

    def start(folder, out):
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "eval", "--beir", str(folder), "--out", str(out)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [start(a, tmp_path / "a.json"), start(b, tmp_path / "b.json")]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    together = {k: json.loads((tmp_path / f"{k}.json").read_text())["minilm"] for k in "ab"}
    alone = {}
    for k, folder in (("a", a), ("b", b)):
        env["RETROFIT_CACHE"] = str(tmp_path / f"alone-{k}")
        p = start(folder, tmp_path / f"{k}-alone.json")
        p.communicate(timeout=600)
        alone[k] = json.loads((tmp_path / f"{k}-alone.json").read_text())["minilm"]
    assert together == alone and together["a"] != together["b"]
    assert not list((tmp_path / "shared-cache").rglob("*.tmp*"))
