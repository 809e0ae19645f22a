"""The reranker: its candidates and loss, its worker (no Ray: it learns, and resumes exactly), the gate's rule,
and reranking a first-stage run."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.rerank import candidates, passes, trusted
from pipeline.retrieval import rerank_run
from tests.test_train import _prep_run


def _rows():
    return [{"positive_id": f"c{i}", "positive_ids": [f"c{i}"] + (["c1"] if i == 0 else []),
             "positive_text": f"P{i}", "negative_texts": [f"N{i}a", f"N{i}b"]} for i in range(4)]


def test_candidates_put_the_positive_first_and_never_score_an_own_positive_as_a_negative():
    rows = _rows()
    assert candidates(rows, 2, hard=1, in_batch=2) == ["P2", "N2a", "P3", "P0"]  # the next rows, wrapping
    # Row 0 counts c1 among its positives: P1 is skipped, the next other positive is taken.
    assert candidates(rows, 0, hard=2, in_batch=1) == ["P0", "N0a", "N0b", "P2"]
    assert candidates(rows, 1, hard=0, in_batch=0) == ["P1"]


@pytest.mark.parametrize("rule, delta, p, shipped", [
    ("significant", 0.02, 0.01, True), ("significant", 0.02, 0.2, False), ("significant", -0.02, 0.01, False),
    ("better", 0.001, 0.9, True), ("better", 0.0, 1.0, False), ("better", -0.03, 0.01, False),
    ("always", -0.05, 0.01, True)])
def test_the_gate_ships_only_what_its_rule_allows(rule, delta, p, shipped):
    assert passes(rule, {"delta": delta, "p_value": p, "significant": p < 0.05}) is shipped


@pytest.mark.parametrize("rule, human, trust, ok", [
    ("significant", False, False, False), ("better", False, False, False), ("significant", True, False, True),
    ("better", False, True, True), ("always", False, False, True)])
def test_synthetic_val_queries_alone_do_not_ship_a_reranker_unless_the_user_says_so(rule, human, trust, ok):
    assert trusted(rule, human, trust) is ok


class _ByLength:
    """Scores a passage by its length: a reranker whose order is known in advance."""

    def score(self, query, passages):
        return np.array([len(p) for p in passages], np.float32)


def test_rerank_run_reorders_the_top_k_and_keeps_the_rest_below_in_first_stage_order():
    run = {"q": {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6}}
    passages = {"a": "x", "b": "xxx", "c": "xx", "d": "xxxxxx"}
    out = rerank_run(_ByLength(), run, passages, {"q": "query"}, top_k=3)
    assert list(sorted(out["q"], key=lambda d: -out["q"][d])) == ["b", "c", "a", "d"]  # d stays below the head


def _worker(tmp_path, run, base_model, name, max_steps=0, resume_dir=None, reports=None):
    from pipeline.config import load_config
    from pipeline.rerank import RerankWorker

    cfg = load_config(None, ["rerank.engine=ddp", "rerank.queries_per_worker=8", "rerank.epochs=3",
                             f"rerank.max_steps={max_steps}", "rerank.max_pair_tokens=48", "rerank.lr=1e-4",
                             "rerank.negatives_per_query=2", "rerank.val_at_checkpoints=true", "rerank.keep=best"])
    config = {"train": cfg.rerank, "seed": 13, "base_model": base_model,
              "train_path": str(run.root / "prep" / "train.parquet"), "val_path": str(run.root / "prep" / "val.parquet"),
              "log_path": str(tmp_path / f"{name}.jsonl"), "tensorboard_dir": str(tmp_path / f"tb-{name}")}
    reports = reports if reports is not None else []

    def report(metrics, folder):
        import shutil

        shutil.copytree(folder, tmp_path / f"{name}-step{metrics['global_step']}")
        reports.append(metrics)

    return RerankWorker(config, rank=0, world=1, resume_dir=resume_dir, report=report), reports


def _losses(path):
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r and "event" not in r]


def test_the_worker_learns_to_rank_positives_first_and_resumes_exactly(tmp_path, base_model):
    """From all-MiniLM-L6-v2 with a new head, without Ray: 3 epochs of 5 steps on 40 rows. The loss falls and
    val NDCG@10 (each val query's positive among its negatives) rises; a worker resumed from the step-5
    checkpoint redoes steps 5.. with the same losses as the run that went on."""
    run = _prep_run(tmp_path / "run")
    worker, reports = _worker(tmp_path, run, base_model, "full")
    untrained = worker.val_ndcg10()
    try:
        worker.run()
    finally:
        worker.close()
    losses = _losses(tmp_path / "full.jsonl")
    assert len(losses) == 15 and np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert [m["global_step"] for m in reports] == [5, 10, 15]
    assert reports[-1]["val_ndcg@10"] > untrained

    resumed, _ = _worker(tmp_path, run, base_model, "resumed", resume_dir=tmp_path / "full-step5")
    try:
        resumed.run()
    finally:
        resumed.close()
    assert np.allclose(_losses(tmp_path / "resumed.jsonl"), losses[5:], atol=1e-5)

    from pipeline.crossencoder import Reranker

    scorer = Reranker(str(tmp_path / "full-step15" / "model"))
    rows = pq.read_table(run.root / "prep" / "val.parquet").to_pylist()
    first = [int(np.argmax(scorer.score(r["query"], [r["positive_text"], *r["negative_texts"]]))) for r in rows]
    assert first.count(0) >= 0.75 * len(rows)  # the saved folder ranks held-out positives first
    assert scorer.max_pair_tokens == 48  # its pair length travels with it
