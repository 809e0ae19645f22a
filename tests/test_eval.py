import json
import subprocess
import sys

import pytest

from pipeline.evaluate import BeirFormatError, compute_metrics, load_beir, retrieve
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
    assert set(metrics) == {"minilm"}
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
