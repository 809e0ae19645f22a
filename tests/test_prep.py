import numpy as np

from pipeline.prep import mine_negatives, roundtrip_filter, split_documents


def test_split_is_by_document_seeded_and_complete():
    docs = [f"d{i}" for i in range(50)]
    a = split_documents(docs + docs, 0.1, 0.2, seed=7)  # repeated ids: one assignment per document
    assert a == split_documents(list(reversed(docs)), 0.1, 0.2, seed=7)  # order does not matter
    assert a != split_documents(docs, 0.1, 0.2, seed=8)
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 35, "val": 5, "test": 10}


def test_tiny_corpus_still_gets_every_split():
    counts = {s: list(split_documents(["a", "b", "c"], 0.1, 0.2, 1).values()).count(s)
              for s in ("train", "val", "test")}
    assert counts == {"train": 1, "val": 1, "test": 1}


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def test_planted_duplicates_same_document_and_test_documents_are_never_negatives():
    rng = np.random.default_rng(0)
    dim = 16
    positive = _unit(rng.normal(size=dim))
    query = _unit(positive + 0.3 * _unit(rng.normal(size=dim)))
    exact_dup = positive.copy()                                       # identical text elsewhere
    near_dup = _unit(positive + 0.05 * _unit(rng.normal(size=dim)))   # near-identical text
    sibling = _unit(positive + 0.4 * _unit(rng.normal(size=dim)))     # same document as the positive
    held_out = _unit(positive + 0.5 * _unit(rng.normal(size=dim)))    # a test-split document
    others = [_unit(positive + s * _unit(rng.normal(size=dim))) for s in (0.9, 1.0, 1.1, 1.3, 1.5, 2.0)]
    emb = np.stack([positive, exact_dup, near_dup, sibling, held_out, *others])
    ids = ["pos", "dup", "near", "sib", "held", *[f"o{i}" for i in range(len(others))]]
    docs = ["D", "X", "Y", "D", "T", *[f"O{i}" for i in range(len(others))]]
    stats = dict.fromkeys(["skipped_top", "same_document", "held_out_document", "above_margin", "kept"], 0)
    [mined] = mine_negatives([{"chunk_id": "pos", "doc_id": "D"}], ids, docs, emb, query[None, :],
                             candidates=10, margin=0.95, skip_top=0, num_negatives=3,
                             banned_docs={"T"}, stats=stats)
    chosen = {ids[j] for j in mined["negatives"]}
    assert chosen.isdisjoint({"pos", "dup", "near", "sib", "held"})
    assert len(chosen) == 3
    assert stats["above_margin"] >= 2 and stats["same_document"] == 1 and stats["held_out_document"] == 1
    assert all(s <= 0.95 * mined["positive_score"] for s in mined["negative_scores"])
    assert stats["scores"]["kept_negative"]["n"] == 3
    assert stats["scores"]["dropped_above_margin"]["p10"] > 0.95 * mined["positive_score"]


def _fake_run(root, queries_per_chunk, seed_text):
    """A run folder whose corpus and sdg stages are complete (real files, real manifests)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.corpus import CHUNK_SCHEMA
    from pipeline.rundir import RunDir, StageRecorder
    from pipeline.sdg import QA_SCHEMA

    run = RunDir(root)
    chunks = [{"chunk_id": f"d{d}#{c}", "doc_id": f"d{d}", "title": f"Doc {d}",
               "text": f"Document {d} part {c} about topic {(d * 7 + c) % 13}", "chunk_index": c, "n_tokens": 8}
              for d in range(12) for c in range(2)]
    with StageRecorder(run, "corpus", "h", {}) as rec:
        pq.write_table(pa.Table.from_pylist(chunks, CHUNK_SCHEMA), rec.output("chunks.parquet"))
    qa = [{"qa_id": f"{c['chunk_id']}::question{j}", "query": f"{seed_text} {j} topic {c['text'][-2:]}?",
           "chunk_id": c["chunk_id"], "doc_id": c["doc_id"], "query_type": "question", "generator": "test"}
          for c in chunks for j in range(queries_per_chunk)]
    with StageRecorder(run, "sdg", "h", {}) as rec:
        pq.write_table(pa.Table.from_pylist(qa, QA_SCHEMA), rec.output("qa.parquet"))
    return run


def test_fixed_evaluation_set_is_reused_across_runs_on_the_same_corpus(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.runner import run_stage

    def prep(run, seed, fixed=True):
        cfg = load_config(None, [f"seed={seed}", f"prep.eval_set_root={tmp_path / 'sets'}",
                                 f"prep.fixed_eval_set={fixed}", "prep.num_negatives=2"])
        run_stage("prep", cfg, run, force=True)
        return pq.read_table(run.root / "prep" / "test.parquet").to_pylist()

    first = prep(_fake_run(tmp_path / "a", 1, "what is"), seed=1)
    # Another run on the same corpus with other queries and another seed: same test queries.
    second = prep(_fake_run(tmp_path / "b", 2, "where is"), seed=2)
    assert [r["qa_id"] for r in second] == [r["qa_id"] for r in first]
    assert [r["query"] for r in second] == [r["query"] for r in first]
    test_docs = {r["positive_doc_id"] for r in first}
    train = pq.read_table(tmp_path / "b" / "prep" / "train.parquet").to_pylist()
    assert test_docs.isdisjoint({r["positive_doc_id"] for r in train})
    # Told otherwise, the split is drawn afresh from this run's seed.
    third = prep(_fake_run(tmp_path / "c", 2, "where is"), seed=2, fixed=False)
    assert {r["positive_doc_id"] for r in third} != test_docs


def test_roundtrip_filter_drops_queries_whose_source_is_not_found():
    qa = [{"query": "good"}, {"query": "The claim is not supported."}, {"query": "far"}]
    mined = [{"positive_rank": 0}, {"positive_rank": -1}, {"positive_rank": 25}]
    kept_qa, kept_mined, summary = roundtrip_filter(qa, mined, top_k=20)
    assert [r["query"] for r in kept_qa] == ["good"] and len(kept_mined) == 1
    assert summary["in"] == 3 and summary["out"] == 1 and "The claim is not supported." in summary["dropped_examples"]
    assert roundtrip_filter(qa, mined, top_k=0)[0] == qa
